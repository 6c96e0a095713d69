//! Secrets: from `SKIFF_SECRET_<NAME>` environment variables and an optional secrets file in
//! `KEY=value` form that nobody but its owner may read.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Secret values by name. Debug output never shows a value.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read secrets file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("secrets file {path} can be read by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("secrets file {path}, line {line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
}

const ENV_PREFIX: &str = "SKIFF_SECRET_";

impl Secrets {
    pub fn new(values: impl IntoIterator<Item = (String, String)>) -> Self {
        Secrets(values.into_iter().collect())
    }

    /// Secrets from the environment, then the file (which wins on a clash).
    pub fn load(
        env: impl IntoIterator<Item = (String, String)>,
        file: Option<&Path>,
    ) -> Result<Self, SecretsError> {
        let mut map: BTreeMap<String, String> = env
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(ENV_PREFIX)
                    .filter(|n| !n.is_empty())
                    .map(|n| (n.to_string(), v))
            })
            .collect();
        if let Some(path) = file {
            let shown = path.display().to_string();
            let meta = std::fs::metadata(path).map_err(|source| SecretsError::Read {
                path: shown.clone(),
                source,
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecretsError::Permissions { path: shown, mode });
            }
            let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
                path: shown.clone(),
                source,
            })?;
            let (values, errors) = crate::kv::parse(&text);
            if let Some(e) = errors.into_iter().next() {
                // The parser's message quotes the line, which may hold a secret: name the line only.
                return Err(SecretsError::Syntax {
                    path: shown,
                    line: e.line,
                    message: "expected NAME=value".into(),
                });
            }
            map.extend(values);
        }
        Ok(Secrets(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.0.values().map(String::as_str)
    }

    /// The secrets' names (what a worker says it holds; never their values).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_env_and_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets");
        std::fs::write(&path, "TOKEN=from-file\nKEY<<END\nmulti\nline\nEND\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let env = vec![
            ("SKIFF_SECRET_TOKEN".to_string(), "from-env".to_string()),
            ("OTHER".into(), "x".into()),
        ];
        let s = Secrets::load(env, Some(&path)).expect("load");
        assert_eq!(s.get("TOKEN"), Some("from-file"));
        assert_eq!(s.get("KEY"), Some("multi\nline"));
        assert_eq!(s.get("OTHER"), None);
        assert!(!format!("{s:?}").contains("from-file"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Secrets::load(Vec::new(), Some(&path)).expect_err("world-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");

        std::fs::write(&path, "not a secret line with hunter2\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = Secrets::load(Vec::new(), Some(&path)).expect_err("syntax");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
