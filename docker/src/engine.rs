//! One Docker engine, through bollard: connecting (the API version agreed with the engine), its
//! identity, building an image from a context, pushing to a registry.

use std::collections::HashMap;
use std::future::Future;

use base64::Engine as _;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, PushImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;

use crate::context::Context;

/// Where the engine's output goes, line by line (the step's log).
pub trait Lines: Send + Sync {
    fn line(&self, text: String) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached or refused the request.
    #[error("the Docker engine at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    /// The engine did what it was asked and it failed (a build step, a push).
    #[error("{0}")]
    Failed(String),
}

/// A connected engine.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    /// How it was reached (`unix:///var/run/docker.sock`, `tcp://HOST:PORT`,
    /// `ssh://USER@HOST:PORT`): what the resources ledger records beside its ID.
    pub endpoint: String,
    /// The engine's own ID (`docker info`): what the resources ledger records.
    pub id: String,
    /// The API version agreed on.
    pub api_version: String,
    pub(crate) target: crate::remote::Target,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("endpoint", &self.endpoint)
            .field("id", &self.id)
            .finish()
    }
}

/// The local engine's socket: `DOCKER_HOST` when it names a unix socket, else the default.
pub fn local_socket() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

/// bollard writes `X-Registry-Auth` in standard base64; the engine reads base64url, so a
/// password whose encoding holds `+` or `/` (`>`, `?`, `~` in it, say) would arrive as no
/// credentials at all. The header is written again, in base64url.
fn reencode_registry_auth(mut req: bollard::BollardRequest) -> bollard::BollardRequest {
    for name in ["x-registry-auth", "x-registry-config"] {
        let Some(value) = req.headers().get(name) else {
            continue;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value.as_bytes()) else {
            continue;
        };
        let encoded = base64::engine::general_purpose::URL_SAFE.encode(decoded);
        if let Ok(v) = encoded.parse() {
            req.headers_mut().insert(name, v);
        }
    }
    req
}

impl Engine {
    /// Connects to the local engine and agrees on the API version with it.
    pub async fn local() -> Result<Engine, EngineError> {
        Engine::connect(crate::remote::Target::Local).await
    }

    /// Connects to an engine, local or remote, and agrees on the API version with it.
    pub async fn connect(target: crate::remote::Target) -> Result<Engine, EngineError> {
        use crate::remote::Target;
        let endpoint = match &target {
            Target::Local => local_socket(),
            Target::Tls { host, port, .. } => format!("tcp://{host}:{port}"),
            Target::Ssh(s) => format!("ssh://{}@{}:{}", s.user, s.host, s.port),
        };
        let unreachable = |e: bollard::errors::Error| EngineError::Unreachable {
            endpoint: endpoint.clone(),
            message: chain(&e),
        };
        let docker = crate::remote::client(&target, 120)
            .map_err(unreachable)?
            .with_request_modifier(reencode_registry_auth);
        // The engine here may speak an older API than bollard's default: agree first, and use
        // the client that comes back.
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        let info = docker.info().await.map_err(unreachable)?;
        let api_version = docker.client_version().to_string();
        Ok(Engine {
            docker,
            id: info.id.unwrap_or_default(),
            endpoint,
            api_version,
            target,
        })
    }

    /// Whether this is the local engine (reached through its socket).
    pub fn is_local(&self) -> bool {
        self.target == crate::remote::Target::Local
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub(crate) fn unreachable(&self, e: bollard::errors::Error) -> EngineError {
        EngineError::Unreachable {
            endpoint: self.endpoint.clone(),
            message: chain(&e),
        }
    }

    /// Builds an image from a context with the classic builder; every line of the build goes to
    /// `lines`; the stream is read to its end (a failure arrives inside it). Returns the image
    /// ID. The first tag is given by the build, the others after it.
    pub async fn build<L: Lines>(
        &self,
        context: Context,
        spec: &BuildSpec,
        lines: &L,
    ) -> Result<String, EngineError> {
        let mut options = BuildImageOptionsBuilder::new()
            .dockerfile(&spec.dockerfile)
            .nocache(spec.no_cache)
            .rm(true)
            .forcerm(true)
            .buildargs(&spec.build_args)
            .labels(&spec.labels);
        if let Some(first) = spec.tags.first() {
            options = options.t(first);
        }
        if let Some(target) = &spec.target {
            options = options.target(target);
        }
        let file = tokio::fs::File::from_std(context.tar);
        let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
        let mut stream = self.docker.build_image(options.build(), None, Some(body));
        let mut image_id = None;
        let mut failure = None;
        let mut partial = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream {
                        partial.push_str(&text);
                        while let Some(at) = partial.find('\n') {
                            let line: String = partial.drain(..=at).collect();
                            lines.line(line.trim_end().to_string()).await;
                        }
                    }
                    if let Some(status) = info.status {
                        lines.line(status).await;
                    }
                    if let Some(id) = info.aux.and_then(|a| a.id) {
                        image_id = Some(id);
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    lines.line(error.trim_end().to_string()).await;
                    failure.get_or_insert(error);
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        if !partial.trim().is_empty() {
            lines.line(partial.trim_end().to_string()).await;
        }
        if let Some(error) = failure {
            return Err(EngineError::Failed(format!(
                "the build failed: {}",
                error.trim()
            )));
        }
        let id = image_id
            .ok_or_else(|| EngineError::Failed("the build ended without an image".into()))?;
        for tag in spec.tags.iter().skip(1) {
            self.tag(&id, tag).await?;
        }
        Ok(id)
    }

    /// Gives `image` the name `reference` (`repo[:tag]`).
    pub async fn tag(&self, image: &str, reference: &str) -> Result<(), EngineError> {
        let (repo, tag) = split_reference(reference);
        self.docker
            .tag_image(
                image,
                Some(TagImageOptionsBuilder::new().repo(repo).tag(tag).build()),
            )
            .await
            .map_err(|e| EngineError::Failed(format!("tagging {reference}: {e}")))
    }

    /// Pushes `reference` (`registry/repo:tag`) with `credentials`; returns the pushed digest.
    /// The stream is read to its end; a failure the engine reports is the error, naming the
    /// registry.
    pub async fn push<L: Lines>(
        &self,
        reference: &str,
        registry: &str,
        credentials: Option<Credentials>,
        lines: &L,
    ) -> Result<String, EngineError> {
        let (repo, tag) = split_reference(reference);
        let creds = credentials.map(|c| DockerCredentials {
            username: Some(c.username),
            password: Some(c.password),
            serveraddress: Some(registry.to_string()),
            ..Default::default()
        });
        let mut stream = self.docker.push_image(
            repo,
            Some(PushImageOptionsBuilder::new().tag(tag).build()),
            creds,
        );
        let mut digest = None;
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status {
                        // "latest: digest: sha256:... size: 528"
                        if let Some(d) =
                            status.split_whitespace().find(|w| w.starts_with("sha256:"))
                        {
                            digest = Some(d.to_string());
                        }
                        // Per-layer progress is noise in a log; its end states are not.
                        if info.progress_detail.is_none()
                            || !matches!(status.as_str(), "Pushing" | "Preparing" | "Waiting")
                        {
                            lines.line(status).await;
                        }
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    failure.get_or_insert(error);
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        if let Some(error) = failure {
            // A spurious end of stream may come after a push that worked: the digest says.
            if digest.is_none() || !error.contains("bytes remaining") {
                return Err(EngineError::Failed(format!(
                    "pushing {reference} to registry {registry} failed: {}",
                    explain_push_error(&error)
                )));
            }
        }
        digest.ok_or_else(|| {
            EngineError::Failed(format!(
                "pushing {reference} to registry {registry} ended without a digest"
            ))
        })
    }

    /// Whether the engine has `image` (a reference or an ID).
    pub async fn has_image(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    /// Pulls `reference` (with `credentials` for its registry); the stream is read to its end,
    /// and a spurious end is checked against the engine before it counts as a failure.
    pub async fn pull<L: Lines>(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
        lines: &L,
    ) -> Result<(), EngineError> {
        let (repo, tag) = split_reference(reference);
        let registry = repo.split('/').next().unwrap_or_default().to_string();
        let creds = credentials.map(|c| DockerCredentials {
            username: Some(c.username),
            password: Some(c.password),
            serveraddress: Some(registry),
            ..Default::default()
        });
        let mut stream = self.docker.create_image(
            Some(
                bollard::query_parameters::CreateImageOptionsBuilder::new()
                    .from_image(repo)
                    .tag(tag)
                    .build(),
            ),
            None,
            creds,
        );
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status
                        && info.progress_detail.is_none()
                    {
                        lines.line(status).await;
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    failure.get_or_insert(error);
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        match failure {
            Some(_) if self.has_image(reference).await => Ok(()),
            Some(error) => Err(EngineError::Failed(format!(
                "pulling {reference} failed: {}",
                explain_push_error(&error)
            ))),
            None => Ok(()),
        }
    }

    /// Removes an image (by ID or reference), with its untagged parents.
    pub async fn remove_image(&self, image: &str) -> Result<(), EngineError> {
        self.docker
            .remove_image(
                image,
                Some(
                    bollard::query_parameters::RemoveImageOptionsBuilder::new()
                        .force(true)
                        .build(),
                ),
                None,
            )
            .await
            .map(|_| ())
            .map_err(|e| EngineError::Failed(format!("removing image {image}: {e}")))
    }
}

/// An error with its causes (hyper's "client error (Connect)" says nothing of why).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn explain_push_error(error: &str) -> String {
    let e = error.trim();
    if e.contains("no basic auth credentials") || e.contains("unauthorized") {
        format!("{e} (the registry refused the credentials: check its username and password)")
    } else {
        e.to_string()
    }
}

/// `host:5000/repo:tag` -> (`host:5000/repo`, `tag`); no tag -> `latest`.
pub fn split_reference(reference: &str) -> (&str, &str) {
    let name_start = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[name_start..].rfind(':') {
        Some(i) => (
            &reference[..name_start + i],
            &reference[name_start + i + 1..],
        ),
        None => (reference, "latest"),
    }
}

/// What a build is asked for.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    pub build_args: HashMap<String, String>,
    pub target: Option<String>,
    pub tags: Vec<String>,
    pub labels: HashMap<String, String>,
    pub no_cache: bool,
}

/// A registry's username and password.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_auth_is_sent_in_base64url() {
        // `{"password":">?~"}`'s standard base64 holds `+` and `/`.
        let standard = base64::engine::general_purpose::STANDARD.encode(r#"{"password":">?~>?~"}"#);
        assert!(standard.contains(['+', '/']), "{standard}");
        let req = bollard::BollardRequest::new(bollard::body_full(Default::default()));
        let mut req = req;
        req.headers_mut()
            .insert("X-Registry-Auth", standard.parse().expect("header"));
        let req = reencode_registry_auth(req);
        let sent = req.headers()["x-registry-auth"].to_str().expect("ascii");
        assert!(!sent.contains(['+', '/']), "{sent}");
        let back = base64::engine::general_purpose::URL_SAFE
            .decode(sent)
            .expect("base64url");
        assert_eq!(back, br#"{"password":">?~>?~"}"#);
    }

    #[test]
    fn references_split_at_the_tag_not_the_port() {
        assert_eq!(
            split_reference("127.0.0.1:5000/app:v1"),
            ("127.0.0.1:5000/app", "v1")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/app"),
            ("127.0.0.1:5000/app", "latest")
        );
        assert_eq!(split_reference("app:2"), ("app", "2"));
        assert_eq!(split_reference("app"), ("app", "latest"));
    }
}
