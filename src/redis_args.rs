//! Reaching Redis (`skiff serve --redis`, `skiff worker`): the URL from a flag or the
//! environment, the password never from a flag (`/proc/PID/cmdline` is readable by every local
//! user): from SKIFF_REDIS_PASSWORD or a file only its owner can read.

use std::path::PathBuf;

use anyhow::Context;
use skiff_redis::redis::{self, IntoConnectionInfo};

#[derive(clap::Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis, for the distributed deployment: redis://[USER@]HOST[:PORT][/DB], rediss:// for
    /// TLS, or redis+unix:///PATH; the password goes in SKIFF_REDIS_PASSWORD or
    /// --redis-password-file, never in the URL
    #[arg(long, env = "SKIFF_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// A file (mode 600) holding the Redis user's password
    #[arg(long, env = "SKIFF_REDIS_PASSWORD_FILE", value_name = "FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// With rediss://: the certificate authority (PEM) that signed Redis's certificate, when it
    /// is not one the system trusts
    #[arg(long, env = "SKIFF_REDIS_CA_FILE", value_name = "FILE")]
    pub redis_ca_file: Option<PathBuf>,
}

/// Where Redis is and who skiff is there.
pub struct Redis {
    /// The URL as given (no password in it).
    pub url: String,
    pub client: redis::Client,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RedisArgs {
    /// The Redis to use, if one was named.
    pub fn resolve(&self) -> anyhow::Result<Option<Redis>> {
        // Without a URL the password and CA files are left alone: a container's environment
        // (SKIFF_REDIS_PASSWORD_FILE) applies to every command run in it.
        let Some(url) = &self.redis else {
            return Ok(None);
        };
        let info = url
            .as_str()
            .into_connection_info()
            .with_context(|| format!("--redis `{}`", redact(url)))?;
        anyhow::ensure!(
            info.redis_settings().password().is_none(),
            "the Redis URL carries a password, and a command line is readable by every local \
             user (/proc/PID/cmdline): give it in SKIFF_REDIS_PASSWORD or in a file named by \
             --redis-password-file"
        );
        let password = password(self.redis_password_file.as_deref())?;
        let username = info.redis_settings().username().map(str::to_string);
        let mut settings = info.redis_settings().clone();
        if let Some(p) = &password {
            settings = settings.set_password(p);
        }
        let info = info.set_redis_settings(settings);
        let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let client = match &self.redis_ca_file {
            Some(ca) => {
                anyhow::ensure!(
                    tls,
                    "--redis-ca-file is for a TLS connection: use a rediss:// URL"
                );
                let root =
                    std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root),
                    },
                )
                .with_context(|| format!("the certificate authority in {}", ca.display()))?
            }
            None => redis::Client::open(info).context("the Redis URL")?,
        };
        Ok(Some(Redis {
            url: url.clone(),
            client,
            username,
            password,
        }))
    }
}

/// The password: from the file (mode 600) or SKIFF_REDIS_PASSWORD, not both.
fn password(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    Ok(crate::credential(
        file,
        "SKIFF_REDIS_PASSWORD",
        "--redis-password-file",
        "the Redis password",
    )?
    .map(|(password, _)| password))
}

/// The URL with whatever sits between `://` and `@` hidden (for an error message).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
