//! Engines on other machines: `tcp://HOST:PORT` with TLS client certificates (bollard's `ssl`
//! transport, rustls), and `ssh://USER@HOST[:PORT]` through the system `ssh` client running
//! `docker system dial-stdio` on the engine's host.
//!
//! bollard 0.21.1's own `ssh` transport is not used: it drops the port of `ssh://user@host:port`
//! (it hands `user@host:port` to openssh's `resolve`, which parses only the `ssh://` form), adds
//! an unknown host key to the user's own known_hosts (`StrictHostKeyChecking=accept-new`), and
//! cannot be given a known_hosts file. Here each request runs
//! `ssh -p PORT -l USER -i KEY -o StrictHostKeyChecking=yes -o UserKnownHostsFile=FILE
//! -o BatchMode=yes -- HOST docker system dial-stdio` (arguments, never a shell line) and speaks
//! HTTP/1 over its stdin and stdout, through `Docker::connect_with_custom_transport`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use bollard::{BollardRequest, Docker};
use hyper_util::rt::TokioIo;

/// How to reach an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The local socket (`DOCKER_HOST=unix://...`, else `/var/run/docker.sock`).
    Local,
    /// `tcp://HOST:PORT`, TLS with a client certificate (PEM files).
    Tls {
        host: String,
        port: u16,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// `ssh://USER@HOST[:PORT]`, with a private key and the host's key in a known_hosts file.
    Ssh(SshTarget),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub key: Option<PathBuf>,
    pub known_hosts: PathBuf,
}

/// A host name or address as `ssh` and `tcp://` take it: letters, digits, `.`, `-`, `:` (IPv6
/// in brackets), never starting with `-` (it would read as an option).
fn host_ok(host: &str) -> bool {
    !host.is_empty()
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// `HOST[:PORT]` -> (host, port); an IPv6 address in brackets keeps them.
fn host_port(text: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        (format!("[{}]", &rest[..end]), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (text.to_string(), default),
        }
    };
    (host_ok(&host) && port > 0).then_some((host, port))
}

/// A `host:` value's form: `tcp://HOST:PORT` or `ssh://USER@HOST[:PORT]`, checked, with the
/// parts; the error is a sentence for the user.
pub fn parse_host(url: &str) -> Result<HostUrl, String> {
    let bad = |why: &str| Err(format!("`{url}` is not an engine host: {why}"));
    if let Some(rest) = url.strip_prefix("tcp://") {
        let rest = rest.trim_end_matches('/');
        if !rest.contains(':') || rest.ends_with(']') {
            return bad("write tcp://HOST:PORT (2376 is Docker's TLS port)");
        }
        return match host_port(rest, 2376) {
            Some((host, port)) => Ok(HostUrl::Tcp { host, port }),
            None => bad("write tcp://HOST:PORT"),
        };
    }
    if let Some(rest) = url.strip_prefix("ssh://") {
        let Some((user, at)) = rest.trim_end_matches('/').split_once('@') else {
            return bad("write ssh://USER@HOST[:PORT]");
        };
        let user_ok = !user.is_empty()
            && !user.starts_with('-')
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !user_ok {
            return bad("a user is letters, digits, `.`, `_`, `-`");
        }
        return match host_port(at, 22) {
            Some((host, port)) => Ok(HostUrl::Ssh {
                user: user.to_string(),
                host,
                port,
            }),
            None => bad("write ssh://USER@HOST[:PORT]"),
        };
    }
    bad("it starts with tcp:// (TLS) or ssh://")
}

/// A checked `host:` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostUrl {
    Tcp {
        host: String,
        port: u16,
    },
    Ssh {
        user: String,
        host: String,
        port: u16,
    },
}

impl SshTarget {
    /// `ssh` with every option skiff sets, `extra` options, then `--`, the host and `remote`
    /// (each an argument: nothing goes through a shell here).
    fn command(&self, extra: &[&str], remote: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.arg("-p")
            .arg(self.port.to_string())
            .arg("-l")
            .arg(&self.user)
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]);
        if let Some(key) = &self.key {
            cmd.args(["-o", "IdentitiesOnly=yes", "-i"]).arg(key);
        }
        cmd.args(extra)
            .arg("--")
            .arg(self.host.trim_start_matches('[').trim_end_matches(']'))
            .args(remote)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// A byte stream through ssh (its stdout and stdin), and the child.
    fn open(&self, extra: &[&str], remote: &[&str]) -> std::io::Result<(Pipes, Child)> {
        let mut child = self.command(extra, remote).spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running ssh (Debian's openssh-client): {e}"),
            )
        })?;
        let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
            return Err(std::io::Error::other("ssh gave no pipes"));
        };
        Ok((tokio::io::join(stdout, stdin), child))
    }

    /// A TCP connection to `addr` made on the engine's host (`ssh -W`): how the health probe
    /// reaches a service published on that host's loopback.
    pub fn connect_from_host(&self, addr: &str) -> std::io::Result<(Pipes, Child)> {
        self.open(&["-W", addr], &[])
    }
}

type Child = tokio::process::Child;
/// ssh's stdout and stdin as one stream.
pub type Pipes = tokio::io::Join<tokio::process::ChildStdout, tokio::process::ChildStdin>;

/// One request over a fresh `ssh ... docker system dial-stdio`: HTTP/1 on its pipes. The child
/// lives until the response's body is read (the connection's task holds it).
async fn ssh_request(
    target: Arc<SshTarget>,
    mut req: BollardRequest,
) -> Result<hyper::Response<hyper::body::Incoming>, bollard::errors::Error> {
    let (stream, mut child) = target.open(&[], &["docker", "system", "dial-stdio"])?;
    let stderr = child.stderr.take();
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(c) => c,
        Err(e) => return Err(ssh_failure(child, stderr, e.to_string()).await),
    };
    // bollard writes `ssh://docker/PATH`: the request line takes the path alone.
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = path
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| std::io::Error::other(e.to_string()))?;
    req.headers_mut().insert(
        hyper::header::HOST,
        hyper::header::HeaderValue::from_static("docker"),
    );
    tokio::spawn(async move {
        let _ = conn.await;
        drop(child);
    });
    sender.send_request(req).await.map_err(Into::into)
}

/// What ssh said on its way out, as the error.
async fn ssh_failure(
    mut child: tokio::process::Child,
    stderr: Option<tokio::process::ChildStderr>,
    what: String,
) -> bollard::errors::Error {
    use tokio::io::AsyncReadExt;
    let _ = child.start_kill();
    let mut said = String::new();
    if let Some(mut e) = stderr {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            e.read_to_string(&mut said),
        )
        .await;
    }
    std::io::Error::other(format!("ssh: {} ({what})", said.trim())).into()
}

/// A bollard client for `target`, not yet checked.
pub(crate) fn client(target: &Target, timeout: u64) -> Result<Docker, bollard::errors::Error> {
    match target {
        Target::Local => Docker::connect_with_unix(
            &crate::engine::local_socket(),
            timeout,
            bollard::API_DEFAULT_VERSION,
        ),
        Target::Tls {
            host,
            port,
            ca,
            cert,
            key,
        } => Docker::connect_with_ssl(
            &format!("tcp://{host}:{port}"),
            key,
            cert,
            ca,
            timeout,
            bollard::API_DEFAULT_VERSION,
        ),
        Target::Ssh(ssh) => {
            let ssh = Arc::new(ssh.clone());
            Docker::connect_with_custom_transport(
                move |req: BollardRequest| ssh_request(ssh.clone(), req),
                Some("ssh://docker"),
                timeout,
                bollard::API_DEFAULT_VERSION,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_hosts() {
        assert_eq!(
            parse_host("tcp://127.0.0.1:2376"),
            Ok(HostUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 2376
            })
        );
        assert_eq!(
            parse_host("ssh://deploy@edge.example:2222"),
            Ok(HostUrl::Ssh {
                user: "deploy".into(),
                host: "edge.example".into(),
                port: 2222
            })
        );
        assert_eq!(
            parse_host("ssh://root@[::1]"),
            Ok(HostUrl::Ssh {
                user: "root".into(),
                host: "[::1]".into(),
                port: 22
            })
        );
        for bad in [
            "tcp://host",
            "http://host:2375",
            "ssh://host",
            "ssh://-oProxyCommand=x@host",
            "ssh://u@-host",
            "ssh://u@host;rm",
            "tcp://h:0",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }
}
