//! `docker/build` and `docker/push`: an image built from a folder of the run's workspace, and
//! pushed to a registry declared in skiff's config.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::{ActionDef, DurationText, HttpStatus, Val};

/// An image reference: `[host[:port]/]name[/name...][:tag]`, lowercase names, a tag of up to 128
/// characters of `A-Za-z0-9_.-` (a digest is not a tag: what is built or pushed has a name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(pub String);

impl ImageRef {
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| Err(format!("`{text}` is not an image reference: {why}"));
        if text.is_empty() || text.len() > 255 {
            return bad("it must be 1 to 255 characters");
        }
        if text.contains('@') {
            return bad("name it by a tag, not a digest");
        }
        let name_start = text.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match text[name_start..].rfind(':') {
            Some(i) => (&text[..name_start + i], Some(&text[name_start + i + 1..])),
            None => (text, None),
        };
        if let Some(tag) = tag
            && (tag.is_empty()
                || tag.len() > 128
                || tag.starts_with(['.', '-'])
                || !tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return bad("a tag is up to 128 of A-Z a-z 0-9 _ . - and does not start with . or -");
        }
        let mut parts: Vec<&str> = path.split('/').collect();
        // A first part with a dot, a colon or `localhost` is a registry host.
        if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
            let host = parts.remove(0);
            if !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
            {
                return bad("the registry host has characters a host cannot have");
            }
        }
        for part in parts {
            let ok = !part.is_empty()
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && part.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return bad("names are lowercase letters, digits and . _ - (not at either end)");
            }
        }
        Ok(ImageRef(text.to_string()))
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ImageRef::parse(&text).map_err(D::Error::custom)
    }
}

/// A path inside the run's workspace: relative, without `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspacePath(pub String);

impl<'de> Deserialize<'de> for WorkspacePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.starts_with('/') || text.split('/').any(|p| p == "..") || text.contains('\0') {
            return Err(D::Error::custom(format!(
                "`{text}` must be a relative path inside the workspace, without `..`"
            )));
        }
        Ok(WorkspacePath(text))
    }
}

pub struct Build;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildWith {
    /// The build context: a folder of the run's workspace (default: the workspace itself).
    pub context: Option<Val<WorkspacePath>>,
    /// The Dockerfile, inside the context (default `Dockerfile`).
    pub dockerfile: Option<Val<WorkspacePath>>,
    #[serde(default)]
    pub build_args: BTreeMap<String, Val<String>>,
    /// The stage to build, in a multi-stage Dockerfile.
    pub target: Option<Val<String>>,
    /// Names to give the image (`app:1.2`, `127.0.0.1:5000/app:latest`).
    #[serde(default)]
    pub tags: Vec<Val<ImageRef>>,
    #[serde(default)]
    pub labels: BTreeMap<String, Val<String>>,
    /// Build every layer again (default false).
    pub no_cache: Option<Val<bool>>,
}

#[derive(Debug, Default, Serialize)]
pub struct BuildOutputs {
    /// The built image's ID (`sha256:...`).
    pub image_id: String,
    /// Its first tag (empty when it has none).
    pub image: String,
}

impl ActionDef for Build {
    const NAME: &'static str = "docker/build";
    const DOC: &'static str =
        "Build an image from a folder of the workspace (the context; links are sent as links).";
    type With = BuildWith;
    type Outputs = BuildOutputs;
    const OUTPUTS: &'static [&'static str] = &["image_id", "image"];
}

pub struct Push;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushWith {
    /// The local image to push (a tag or an ID).
    pub image: Val<String>,
    /// A registry declared in skiff's config (`[[registry]]` in skiff.toml), by name.
    pub registry: Val<String>,
    /// The repository in the registry, with an optional tag (`app:1.2`; default: the image's
    /// own name and tag).
    pub repository: Option<Val<ImageRef>>,
}

#[derive(Debug, Default, Serialize)]
pub struct PushOutputs {
    /// What was pushed, in full (`registry.example:5000/app:1.2`).
    pub image: String,
    /// The pushed manifest's digest (`sha256:...`).
    pub digest: String,
}

impl ActionDef for Push {
    const NAME: &'static str = "docker/push";
    const DOC: &'static str = "Push an image to a registry declared in skiff's config.";
    type With = PushWith;
    type Outputs = PushOutputs;
    const OUTPUTS: &'static [&'static str] = &["image", "digest"];
}

/// A service's name: what it is known by on its engine (label `skiff.service`) and the start
/// of its containers' names: 1 to 40 of `a-z 0-9 -`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName(pub String);

impl ServiceName {
    pub fn parse(text: &str) -> Result<ServiceName, String> {
        let ok = (1..=40).contains(&text.len())
            && text.starts_with(|c: char| c.is_ascii_lowercase())
            && !text.ends_with('-')
            && text
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(format!(
                "`{}` is not a service name: 1 to 40 of a-z 0-9 -, starting with a letter",
                text.chars().take(60).collect::<String>()
            ));
        }
        Ok(ServiceName(text.to_string()))
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ServiceName::parse(&text).map_err(D::Error::custom)
    }
}

/// A remote engine as `docker/deploy`'s `host` names it: `tcp://HOST:PORT` or
/// `ssh://USER@HOST[:PORT]` (the worker checks it further against skiff's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineHost(pub String);

impl<'de> Deserialize<'de> for EngineHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let rest = text
            .strip_prefix("tcp://")
            .or_else(|| text.strip_prefix("ssh://"));
        let ok = rest.is_some_and(|r| {
            !r.is_empty()
                && !r.starts_with('-')
                && r.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '.' | '-' | '_' | ':' | '@' | '[' | ']')
                })
        });
        if !ok {
            return Err(D::Error::custom(format!(
                "`{}` is not an engine host: tcp://HOST:PORT (TLS) or ssh://USER@HOST[:PORT], declared in skiff's config",
                text.chars().take(80).collect::<String>()
            )));
        }
        Ok(EngineHost(text))
    }
}

/// A file name under `/run/secrets`: 1 to 64 of `A-Z a-z 0-9 _ . -`, not starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretFileName(pub String);

impl<'de> Deserialize<'de> for SecretFileName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let ok = (1..=64).contains(&text.len())
            && !text.starts_with('.')
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(D::Error::custom(format!(
                "`{text}` is not a secret file name: 1 to 64 of A-Z a-z 0-9 _ . -, not starting with a dot"
            )));
        }
        Ok(SecretFileName(text))
    }
}

/// A value written as text or as a number (`8080`, `"80:8080"`, `256m`), as text; anything else
/// is refused with `expected`.
fn scalar_text<'de, D: Deserializer<'de>>(d: D, expected: &str) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        _ => Err(D::Error::custom(expected)),
    }
}

/// A published port: `8080` (the engine picks a free host port) or `HOST:CONTAINER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortText {
    pub container: u16,
    pub host: Option<u16>,
}

impl<'de> Deserialize<'de> for PortText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = scalar_text(d, "a port is `8080` or `HOST:CONTAINER`")?;
        let num = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "`{text}` is not a port: `8080` or `HOST:CONTAINER`"
                    ))
                })
        };
        Ok(match text.split_once(':') {
            Some((h, c)) => PortText {
                container: num(c)?,
                host: Some(num(h)?),
            },
            None => PortText {
                container: num(&text)?,
                host: None,
            },
        })
    }
}

/// A memory size: `256m`, `1g`, `512k` or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryText(pub i64);

impl<'de> Deserialize<'de> for MemoryText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = scalar_text(d, "a memory size is like `256m` or `1g`")?
            .trim()
            .to_ascii_lowercase();
        let (num, unit) = text.split_at(
            text.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len()),
        );
        let factor: i64 = match unit.trim_end_matches('b') {
            "" => 1,
            "k" => 1 << 10,
            "m" => 1 << 20,
            "g" => 1 << 30,
            _ => {
                return Err(D::Error::custom(format!(
                    "`{text}`: a memory size is like `256m` or `1g`"
                )));
            }
        };
        let bytes = num
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .filter(|b| *b >= 6 << 20)
            .ok_or_else(|| {
                D::Error::custom(format!("`{text}`: at least 6m (the engine's minimum)"))
            })?;
        Ok(MemoryText(bytes))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    No,
    Always,
    UnlessStopped,
    OnFailure,
}

impl Restart {
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::No => "no",
            Restart::Always => "always",
            Restart::UnlessStopped => "unless-stopped",
            Restart::OnFailure => "on-failure",
        }
    }
}

/// How a deploy knows the new container is ready.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthWith {
    /// The container port to probe with GET (must be in `ports`); without it, the image's own
    /// HEALTHCHECK decides.
    pub port: Option<Val<u16>>,
    /// The path to GET (default `/`).
    pub path: Option<Val<String>>,
    /// The status that means ready (default 200).
    pub status: Option<Val<HttpStatus>>,
    /// How long to wait (default 30s).
    pub timeout: Option<Val<DurationText>>,
}

pub struct Deploy;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployWith {
    /// The service: one name, whatever version runs.
    pub name: Val<ServiceName>,
    /// The image to run (pulled when the engine does not have it).
    pub image: Val<String>,
    /// The engine to run it on: `tcp://HOST:PORT` or `ssh://USER@HOST[:PORT]`, declared in
    /// skiff's config (`[[engine]]`, with its certificates or key); default the worker's own.
    pub host: Option<Val<EngineHost>>,
    #[serde(default)]
    pub ports: Vec<Val<PortText>>,
    /// Environment variables (`${{ secrets.X }}` allowed, but readable by anyone with the Docker
    /// socket through `docker inspect`: prefer `secrets`).
    #[serde(default)]
    pub env: BTreeMap<String, Val<String>>,
    /// Files at `/run/secrets/NAME` (mode 0444) with these values, put into the container
    /// before it starts: not in its environment or `docker inspect`.
    #[serde(default)]
    pub secrets: BTreeMap<SecretFileName, Val<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, Val<String>>,
    /// Default `unless-stopped`.
    pub restart: Option<Val<Restart>>,
    pub memory: Option<Val<MemoryText>>,
    pub cpus: Option<Val<f64>>,
    /// An init process as PID 1 (signals reach the service; default true).
    pub init: Option<Val<bool>>,
    pub stop_signal: Option<Val<String>>,
    pub stop_timeout: Option<Val<DurationText>>,
    pub health: Option<HealthWith>,
    /// A temporary service: removed by the reaper (`skiff reap`, `docker/reap`) this long after
    /// it was deployed. Without it the service is kept until it is stopped and removed.
    pub ttl: Option<Val<DurationText>>,
}

impl DeployWith {
    pub const DEFAULT_HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
}

#[derive(Debug, Default, Serialize)]
pub struct DeployOutputs {
    pub container_id: String,
    /// `<name>-<run number>-<attempt>`.
    pub container: String,
    /// `http://127.0.0.1:PORT` for each published port, space-separated.
    pub addresses: String,
}

impl ActionDef for Deploy {
    const NAME: &'static str = "docker/deploy";
    const DOC: &'static str = "Run a service as a container, healthy before the old one goes (rolled back if it never is).";
    type With = DeployWith;
    type Outputs = DeployOutputs;
    const OUTPUTS: &'static [&'static str] = &["container_id", "container", "addresses"];
}

pub struct Stop;

#[derive(Debug, Deserialize)]
#[serde(try_from = "StopFields")]
pub struct StopWith {
    /// The service to stop (every running container of it on the worker's engine).
    pub name: Option<Val<ServiceName>>,
    /// Instead of `name`: every service deployed with a `ttl` (a temporary one) that the
    /// resources ledger holds live (the nightly teardown).
    pub temporary: Option<Val<bool>>,
    /// Remove its containers too (default false: a stopped service can be started again).
    pub remove: Option<Val<bool>>,
}

/// `docker/stop`'s fields as written; [`StopWith`] once one of `name` and `temporary` is
/// known to be there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopFields {
    name: Option<Val<ServiceName>>,
    temporary: Option<Val<bool>>,
    remove: Option<Val<bool>>,
}

impl TryFrom<StopFields> for StopWith {
    type Error = String;

    fn try_from(f: StopFields) -> Result<Self, String> {
        match (&f.name, &f.temporary) {
            (None, None) => {
                return Err(
                    "give `name` (one service) or `temporary: true` (every service deployed with a `ttl`)"
                        .into(),
                );
            }
            (Some(_), Some(_)) => return Err("give `name` or `temporary`, not both".into()),
            (None, Some(Val::Lit(false))) => {
                return Err("`temporary: false` stops nothing: give `name` instead".into());
            }
            _ => {}
        }
        Ok(StopWith {
            name: f.name,
            temporary: f.temporary,
            remove: f.remove,
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct StopOutputs {
    /// How many containers were stopped.
    pub stopped: u32,
}

impl ActionDef for Stop {
    const NAME: &'static str = "docker/stop";
    const DOC: &'static str =
        "Stop a service, or every temporary one (and, with `remove`, remove their containers).";
    type With = StopWith;
    type Outputs = StopOutputs;
    const OUTPUTS: &'static [&'static str] = &["stopped"];
}

pub struct Start;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartWith {
    /// The service to start again (its latest container).
    pub name: Val<ServiceName>,
}

#[derive(Debug, Default, Serialize)]
pub struct StartOutputs {
    pub container: String,
    /// `http://127.0.0.1:PORT` for each published port, space-separated.
    pub addresses: String,
}

impl ActionDef for Start {
    const NAME: &'static str = "docker/start";
    const DOC: &'static str = "Start a stopped service again (its latest version).";
    type With = StartWith;
    type Outputs = StartOutputs;
    const OUTPUTS: &'static [&'static str] = &["container", "addresses"];
}

pub struct Reap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReapWith {
    /// Only say what would be removed (default false).
    pub dry_run: Option<Val<bool>>,
}

#[derive(Debug, Default, Serialize)]
pub struct ReapOutputs {
    /// How many containers and images were removed (or would be).
    pub removed: u32,
}

impl ActionDef for Reap {
    const NAME: &'static str = "docker/reap";
    const DOC: &'static str =
        "Remove from the worker's engine what runs created and nobody keeps (a nightly teardown).";
    type With = ReapWith;
    type Outputs = ReapOutputs;
    const OUTPUTS: &'static [&'static str] = &["removed"];
}

pub struct Prune;

/// An age: a duration of up to ten years (`30d`, `12h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgeText(pub std::time::Duration);

impl<'de> Deserialize<'de> for AgeText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse_up_to(&text, std::time::Duration::from_secs(3650 * 86_400))
            .map(AgeText)
            .map_err(D::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneWith {
    /// Only what was made longer ago than this (`7d`, `12h`; required: a prune says how old).
    pub older_than: Val<AgeText>,
    /// Only say what would be removed (default false).
    pub dry_run: Option<Val<bool>>,
}

#[derive(Debug, Default, Serialize)]
pub struct PruneOutputs {
    /// How many containers and images were removed (or would be).
    pub removed: u32,
    /// How many were kept because a service owns them (its current container, the images of
    /// its current and previous versions).
    pub kept: u32,
}

impl ActionDef for Prune {
    const NAME: &'static str = "docker/prune";
    const DOC: &'static str = "Remove from the worker's engine the containers and images skiff made that no service owns, older than `older_than`.";
    type With = PruneWith;
    type Outputs = PruneOutputs;
    const OUTPUTS: &'static [&'static str] = &["removed", "kept"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "app",
            "app:1.2",
            "127.0.0.1:5000/team/app:v1",
            "localhost/app",
            "registry.example.com/a_b/c-d",
        ] {
            assert!(ImageRef::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "App",
            "app:",
            "app:-x",
            "app@sha256:00",
            "a//b",
            "app;rm -rf",
            "-app",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
