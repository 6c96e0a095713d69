//! `docker/build` and `docker/push`: an image built from a folder of the run's workspace, and
//! pushed to a registry declared in skiff's config.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::{ActionDef, Val};

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
