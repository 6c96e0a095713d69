//! skiff's config file (`skiff.toml`, or `--config PATH`), read by `serve` and `worker`: what
//! pipelines refer to by name and must not hold themselves. Today: the registries images are
//! pushed to.
//!
//! ```toml
//! [[registry]]
//! name = "home"
//! kind = "registry"            # Docker Distribution v2 (basic auth); "ecr" comes with AWS
//! url = "127.0.0.1:5000"
//! username = "skiff"
//! password = "${{ secrets.REGISTRY_PASSWORD }}"
//! ```
//!
//! A password is always a secret's name, never the password itself: the config file may be
//! read by people who must not know it, and the secret is masked in every log.
//!
//! Remote Docker engines `docker/deploy` may name as `host`, with how to reach them:
//!
//! ```toml
//! [[engine]]
//! host = "tcp://10.0.0.5:2376"     # TLS with a client certificate (PEM files)
//! tls_ca = "/etc/skiff/edge/ca.pem"
//! tls_cert = "/etc/skiff/edge/cert.pem"
//! tls_key = "/etc/skiff/edge/key.pem"
//!
//! [[engine]]
//! host = "ssh://deploy@10.0.0.6:22"  # the system ssh client runs `docker system dial-stdio`
//! ssh_key = "/etc/skiff/edge/id_ed25519"
//! known_hosts = "/etc/skiff/edge/known_hosts"   # the host's key: never taken on first sight
//! ```

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "registry")]
    pub registries: Vec<RegistryConfig>,
    #[serde(default, rename = "engine")]
    pub engines: Vec<EngineConfig>,
}

/// A remote Docker engine and how to reach it (files the worker reads; never in a pipeline).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `tcp://HOST:PORT` or `ssh://USER@HOST[:PORT]`: what `docker/deploy`'s `host` names.
    pub host: String,
    /// tcp://: the CA that signed the engine's certificate, the client certificate and its key.
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// ssh://: the private key (default: ssh's own) and the known_hosts file with the host's key.
    pub ssh_key: Option<std::path::PathBuf>,
    pub known_hosts: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    /// A Docker Distribution (v2) registry with basic auth.
    Registry,
    /// Amazon ECR (credentials from AWS).
    Ecr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub name: String,
    pub kind: RegistryKind,
    /// `host[:port]`, as image references name it.
    pub url: String,
    pub username: Option<String>,
    /// `${{ secrets.NAME }}`: the secret's name is kept.
    #[serde(default, deserialize_with = "secret_ref")]
    pub password: Option<String>,
}

fn secret_ref<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    let name = text
        .trim()
        .strip_prefix("${{")
        .and_then(|r| r.strip_suffix("}}"))
        .map(str::trim)
        .and_then(|r| r.strip_prefix("secrets."))
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    match name {
        Some(n) => Ok(Some(n.to_string())),
        None => Err(serde::de::Error::custom(
            "a password is written as \"${{ secrets.NAME }}\" (a secret skiff is given, SKIFF_SECRET_NAME), never as the password itself",
        )),
    }
}

impl Config {
    /// Reads a config file; an error names the file, and the line and column where there is one.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: ")
                })
                .unwrap_or_default();
            format!("{at}{}", e.message())
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for r in &config.registries {
            if !seen.insert(r.name.as_str()) {
                return Err(format!("registry `{}` is declared twice", r.name));
            }
            if r.url.contains("://") || r.url.contains('/') || r.url.is_empty() {
                return Err(format!(
                    "registry `{}`: url is `host[:port]` as image names write it (no scheme, no path), not `{}`",
                    r.name, r.url
                ));
            }
        }
        let mut hosts = std::collections::BTreeSet::new();
        for e in &config.engines {
            if !hosts.insert(e.host.as_str()) {
                return Err(format!("engine `{}` is declared twice", e.host));
            }
            let tls = [&e.tls_ca, &e.tls_cert, &e.tls_key];
            if e.host.starts_with("tcp://") {
                if tls.iter().any(|f| f.is_none()) || e.ssh_key.is_some() || e.known_hosts.is_some()
                {
                    return Err(format!(
                        "engine `{}`: a tcp:// engine takes tls_ca, tls_cert and tls_key (a Docker engine without TLS is root for anyone who reaches it)",
                        e.host
                    ));
                }
            } else if e.host.starts_with("ssh://") {
                if e.known_hosts.is_none() || tls.iter().any(|f| f.is_some()) {
                    return Err(format!(
                        "engine `{}`: an ssh:// engine takes known_hosts (the host's key) and, optionally, ssh_key",
                        e.host
                    ));
                }
            } else {
                return Err(format!(
                    "engine `{}`: host is tcp://HOST:PORT (TLS) or ssh://USER@HOST[:PORT]",
                    e.host
                ));
            }
        }
        Ok(config)
    }

    pub fn engine(&self, host: &str) -> Option<&EngineConfig> {
        self.engines.iter().find(|e| e.host == host)
    }

    /// What the pipeline loader is told: the registries declared here.
    pub fn load_options(&self) -> crate::pipeline::LoadOptions {
        crate::pipeline::LoadOptions {
            registries: Some(self.registries.iter().map(|r| r.name.clone()).collect()),
        }
    }

    pub fn registry(&self, name: &str) -> Option<&RegistryConfig> {
        self.registries.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_with_secret_passwords() {
        let c = Config::parse(
            "[[registry]]\nname = \"home\"\nkind = \"registry\"\nurl = \"127.0.0.1:5000\"\nusername = \"skiff\"\npassword = \"${{ secrets.REG_PW }}\"\n",
        )
        .expect("valid");
        let r = c.registry("home").expect("declared");
        assert_eq!(r.password.as_deref(), Some("REG_PW"));
        assert_eq!(r.kind, RegistryKind::Registry);
        let e = Config::parse(
            "[[registry]]\nname = \"home\"\nkind = \"registry\"\nurl = \"h:1\"\npassword = \"hunter2\"\n",
        )
        .expect_err("a plain password");
        assert!(e.contains("line 5") && e.contains("secrets.NAME"), "{e}");
        let e =
            Config::parse("[[registry]]\nname = \"a\"\nkind = \"registry\"\nurl = \"http://h\"\n")
                .expect_err("a scheme");
        assert!(e.contains("host[:port]"), "{e}");
        let e = Config::parse("[[registry]]\nname = \"a\"\nkind = \"quay\"\nurl = \"h\"\n")
            .expect_err("a kind");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn engines_say_how_to_reach_them() {
        let c = Config::parse(
            "[[engine]]\nhost = \"tcp://10.0.0.5:2376\"\ntls_ca = \"/c/ca.pem\"\ntls_cert = \"/c/cert.pem\"\ntls_key = \"/c/key.pem\"\n\n[[engine]]\nhost = \"ssh://deploy@10.0.0.6\"\nknown_hosts = \"/c/known_hosts\"\n",
        )
        .expect("valid");
        assert!(c.engine("tcp://10.0.0.5:2376").is_some());
        assert!(c.engine("ssh://deploy@10.0.0.6").is_some());
        for (bad, says) in [
            ("[[engine]]\nhost = \"tcp://h:2375\"\n", "tls_ca"),
            ("[[engine]]\nhost = \"ssh://u@h\"\n", "known_hosts"),
            ("[[engine]]\nhost = \"http://h:2375\"\n", "tcp://HOST:PORT"),
        ] {
            let e = Config::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
