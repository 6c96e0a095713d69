//! Services as containers: a service is its name (label `skiff.service`) on an engine; each
//! deploy makes a container `<name>-<run number>-<attempt>`, so an old and a new one can run side
//! by side. Creating, starting, stopping, removing, listing a service's containers, and waiting
//! until one is healthy.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use tokio::time::Instant;

use crate::engine::{Engine, EngineError};

pub const SERVICE_LABEL: &str = "skiff.service";

/// One published port: the container's, and the host's (none: the engine picks a free one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub container: u16,
    pub host: Option<u16>,
}

/// What a service's container is made from.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub service: String,
    /// `<service>-<run number>-<attempt>`.
    pub name: String,
    pub image: String,
    pub ports: Vec<Port>,
    pub env: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
    /// `no`, `always`, `unless-stopped`, `on-failure`.
    pub restart: Option<String>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub init: bool,
    pub stop_signal: Option<String>,
    pub stop_timeout: Option<i64>,
    /// Files at `/run/secrets/NAME` (mode 0444), put into the container before it starts: not
    /// in its environment, its config or `docker inspect`.
    pub secret_files: Vec<(String, String)>,
}

/// The tar of `run/secrets/NAME` files, to extract at `/`.
fn secrets_tar(files: &[(String, String)]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["run", "run/secrets"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, dir, std::io::empty())?;
    }
    for (name, value) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o444);
        h.set_size(value.len() as u64);
        tar.append_data(&mut h, format!("run/secrets/{name}"), value.as_bytes())?;
    }
    tar.into_inner()
}

/// A container of a service, as the engine lists it.
#[derive(Debug, Clone)]
pub struct ServiceContainer {
    pub id: String,
    pub name: String,
    pub running: bool,
    /// Published ports: (container, host).
    pub ports: Vec<(u16, u16)>,
    /// The ID of the image it runs (`sha256:...`).
    pub image_id: String,
}

/// A container or image on an engine that carries skiff's run label (`skiff.run`).
#[derive(Debug, Clone)]
pub struct Labelled {
    /// `container` or `image`.
    pub kind: &'static str,
    pub id: String,
    /// A container's name, an image's first tag (empty when it has none).
    pub name: String,
    pub run: String,
    /// `skiff.service`, when it has one.
    pub service: Option<String>,
    /// When the engine made it.
    pub created: Option<chrono::DateTime<chrono::Utc>>,
}

/// A container as its engine says it is now.
#[derive(Debug, Clone)]
pub struct ContainerView {
    pub running: bool,
    /// When it started (running) or stopped.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub exit_code: Option<i64>,
    /// Its HEALTHCHECK's verdict, if the image has one.
    pub health: Option<String>,
    /// The image as it was named when the container was made.
    pub image: Option<String>,
    /// Published ports: (container, host).
    pub ports: Vec<(u16, u16)>,
}

/// How to tell a started container is ready.
#[derive(Debug, Clone)]
pub enum Health {
    /// GET `path` on the host port published for `port` until it answers `status`.
    Http {
        port: u16,
        path: String,
        status: u16,
    },
    /// The image's own HEALTHCHECK says healthy.
    Image,
    /// Still running a moment after it started.
    Running,
}

impl Engine {
    /// Every container of `service` on this engine, running or not, newest first.
    pub async fn service_containers(
        &self,
        service: &str,
    ) -> Result<Vec<ServiceContainer>, EngineError> {
        let list = self
            .containers_where("label", format!("{SERVICE_LABEL}={service}"))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut list = list;
        list.sort_by_key(|c| std::cmp::Reverse(c.created.unwrap_or(0)));
        Ok(list
            .into_iter()
            .map(|c| ServiceContainer {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                ports: c
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| Some((p.private_port, p.public_port?)))
                    .collect(),
                image_id: c.image_id.unwrap_or_default(),
            })
            .collect())
    }

    /// Every container (running or not) that one filter (`label`, `ancestor`...) picks.
    async fn containers_where(
        &self,
        filter: &str,
        value: String,
    ) -> Result<Vec<bollard::models::ContainerSummary>, bollard::errors::Error> {
        let filters = HashMap::from([(filter, vec![value])]);
        self.client()
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
    }

    /// Every container and image on this engine with a `skiff.run` label: what skiff made here,
    /// whatever the ledger says (a lost record is found this way).
    pub async fn labelled(&self) -> Result<Vec<Labelled>, EngineError> {
        let containers = self
            .containers_where("label", "skiff.run".to_string())
            .await
            .map_err(|e| self.unreachable(e))?;
        let filters = HashMap::from([("label", vec!["skiff.run".to_string()])]);
        let images = self
            .client()
            .list_images(Some(
                bollard::query_parameters::ListImagesOptionsBuilder::new()
                    .all(false)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| self.unreachable(e))?;
        let at = |secs: i64| chrono::DateTime::from_timestamp(secs, 0);
        let mut out = Vec::new();
        for c in containers {
            let labels = c.labels.unwrap_or_default();
            let Some(run) = labels.get("skiff.run").cloned() else {
                continue;
            };
            out.push(Labelled {
                kind: "container",
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                run,
                service: labels.get(SERVICE_LABEL).cloned(),
                created: c.created.and_then(at),
            });
        }
        for i in images {
            let Some(run) = i.labels.get("skiff.run").cloned() else {
                continue;
            };
            out.push(Labelled {
                kind: "image",
                name: i
                    .repo_tags
                    .iter()
                    .find(|t| t.as_str() != "<none>:<none>")
                    .cloned()
                    .unwrap_or_default(),
                service: i.labels.get(SERVICE_LABEL).cloned(),
                id: i.id,
                run,
                created: at(i.created),
            });
        }
        Ok(out)
    }

    /// An image's ID (`sha256:...`) from a reference or an ID; None when the engine lacks it.
    pub async fn image_id(&self, image: &str) -> Option<String> {
        self.client().inspect_image(image).await.ok()?.id
    }

    /// Whether any container (running or not) was made from `image`.
    pub async fn image_in_use(&self, image: &str) -> bool {
        // When the engine cannot say, the image counts as used: it stays.
        self.containers_using(image)
            .await
            .is_none_or(|users| !users.is_empty())
    }

    /// The IDs of the containers (running or not) made from `image` or an image built on it;
    /// None when the engine cannot say.
    pub async fn containers_using(&self, image: &str) -> Option<Vec<String>> {
        let list = self
            .containers_where("ancestor", image.to_string())
            .await
            .ok()?;
        Some(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Whether a container or image (`kind`) carries the label `skiff.run=RUN`.
    pub async fn labelled_with_run(&self, kind: &str, id: &str, run: &str) -> bool {
        let labels = if kind == "container" {
            self.client()
                .inspect_container(id, None)
                .await
                .ok()
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
        } else {
            self.client()
                .inspect_image(id)
                .await
                .ok()
                .and_then(|i| i.config)
                .and_then(|c| c.labels)
        };
        labels.is_some_and(|l| l.get("skiff.run").map(String::as_str) == Some(run))
    }

    /// Creates and starts a container; its published ports once started.
    pub async fn run_container(
        &self,
        spec: &ContainerSpec,
    ) -> Result<ServiceContainer, EngineError> {
        let mut bindings = HashMap::new();
        let mut exposed = Vec::new();
        for p in &spec.ports {
            let key = format!("{}/tcp", p.container);
            exposed.push(key.clone());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    // Services answer on loopback only unless a proxy in front says otherwise.
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(p.host.map(|h| h.to_string()).unwrap_or_default()),
                }]),
            );
        }
        let mut labels = spec.labels.clone();
        labels.insert(SERVICE_LABEL.into(), spec.service.clone());
        let restart = match spec.restart.as_deref() {
            None | Some("no") => RestartPolicyNameEnum::NO,
            Some("always") => RestartPolicyNameEnum::ALWAYS,
            Some("unless-stopped") => RestartPolicyNameEnum::UNLESS_STOPPED,
            Some("on-failure") => RestartPolicyNameEnum::ON_FAILURE,
            Some(other) => {
                return Err(EngineError::Failed(format!(
                    "restart `{other}`: one of no, always, unless-stopped, on-failure"
                )));
            }
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(exposed),
            stop_signal: spec.stop_signal.clone(),
            stop_timeout: spec.stop_timeout,
            host_config: Some(HostConfig {
                port_bindings: Some(bindings),
                init: Some(spec.init),
                memory: spec.memory_bytes,
                nano_cpus: spec.nano_cpus,
                restart_policy: Some(RestartPolicy {
                    name: Some(restart),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .client()
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::new()
                        .name(&spec.name)
                        .build(),
                ),
                body,
            )
            .await
            .map_err(|e| EngineError::Failed(format!("creating container {}: {e}", spec.name)))?;
        if !spec.secret_files.is_empty() {
            let put = async {
                let tar = secrets_tar(&spec.secret_files).map_err(|e| e.to_string())?;
                self.client()
                    .upload_to_container(
                        &created.id,
                        Some(
                            bollard::query_parameters::UploadToContainerOptionsBuilder::new()
                                .path("/")
                                .build(),
                        ),
                        bollard::body_full(tar.into()),
                    )
                    .await
                    .map_err(|e| e.to_string())
            };
            if let Err(e) = put.await {
                let _ = self.remove_container(&created.id).await;
                return Err(EngineError::Failed(format!(
                    "putting the secret files into {}: {e}",
                    spec.name
                )));
            }
        }
        if let Err(e) = self.client().start_container(&created.id, None).await {
            let _ = self.remove_container(&created.id).await;
            return Err(EngineError::Failed(format!(
                "starting container {}: {e}",
                spec.name
            )));
        }
        let c = self.inspect(&created.id).await?;
        self.announce(&c);
        Ok(service_container(c))
    }

    /// One container's state and published ports.
    pub async fn container(&self, id: &str) -> Result<ServiceContainer, EngineError> {
        Ok(service_container(self.inspect(id).await?))
    }

    /// The addresses of a container of the local engine (none for another engine: its
    /// containers are not on this host's interfaces).
    fn local_endpoints(
        &self,
        c: &bollard::models::ContainerInspectResponse,
    ) -> Vec<crate::neighbour::Endpoint> {
        if !matches!(self.target, crate::remote::Target::Local) {
            return Vec::new();
        }
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        networks
            .into_iter()
            .flatten()
            .filter_map(|(_, net)| {
                crate::neighbour::Endpoint::parse(
                    net.ip_address.as_deref()?,
                    net.mac_address.as_deref()?,
                )
            })
            .collect()
    }

    /// Tells this host's kernel the addresses of a container that just started (see
    /// [`crate::neighbour`]); where skiff may not, nothing changes.
    fn announce(&self, c: &bollard::models::ContainerInspectResponse) {
        for e in self.local_endpoints(c) {
            if let Err(err) = crate::neighbour::announce(&e) {
                tracing::debug!(ip = %e.ip, "container address not announced: {err}");
            }
        }
    }

    /// The addresses of a local container about to stop, to forget once it has.
    async fn endpoints_before_stop(&self, id: &str) -> Vec<crate::neighbour::Endpoint> {
        if !matches!(self.target, crate::remote::Target::Local) {
            return Vec::new();
        }
        match self.client().inspect_container(id, None).await {
            Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                self.local_endpoints(&c)
            }
            _ => Vec::new(),
        }
    }

    fn forget(endpoints: Vec<crate::neighbour::Endpoint>) {
        for e in endpoints {
            if let Err(err) = crate::neighbour::forget(e.ip) {
                tracing::debug!(ip = %e.ip, "stopped container's address not forgotten: {err}");
            }
        }
    }
}

/// A container's state and published ports, from its inspection.
fn service_container(c: bollard::models::ContainerInspectResponse) -> ServiceContainer {
    let ports = published_ports(&c);
    ServiceContainer {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        running: c.state.as_ref().and_then(|s| s.running).unwrap_or(false),
        ports,
        image_id: c.image.unwrap_or_default(),
    }
}

impl Engine {
    /// What the engine says of a container now; None when it has no such container.
    pub async fn observe(&self, id: &str) -> Result<Option<ContainerView>, EngineError> {
        let c = match self.client().inspect_container(id, None).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(self.unreachable(e)),
        };
        let ports = published_ports(&c);
        let state = c.state.unwrap_or_default();
        let running = state.running == Some(true);
        let time = |t: Option<&str>| {
            t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
                // A container that never ran says 0001-01-01.
                .filter(|t| t.timestamp() > 0)
        };
        Ok(Some(ContainerView {
            running,
            since: if running {
                time(state.started_at.as_deref())
            } else {
                time(state.finished_at.as_deref())
            },
            exit_code: (!running).then_some(state.exit_code).flatten(),
            health: state
                .health
                .and_then(|h| h.status)
                .filter(|s| {
                    *s != bollard::models::HealthStatusEnum::NONE
                        && *s != bollard::models::HealthStatusEnum::EMPTY
                })
                .map(|s| s.to_string()),
            image: c.config.and_then(|c| c.image),
            ports,
        }))
    }

    /// When a container that is not running stopped; None while it runs (or never ran).
    pub async fn stopped_at(
        &self,
        id: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, EngineError> {
        let state = self.inspect(id).await?.state.unwrap_or_default();
        if state.running == Some(true) {
            return Ok(None);
        }
        Ok(state
            .finished_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc)))
    }

    async fn inspect(
        &self,
        id: &str,
    ) -> Result<bollard::models::ContainerInspectResponse, EngineError> {
        self.client()
            .inspect_container(id, None)
            .await
            .map_err(|e| EngineError::Failed(format!("inspecting container {id}: {e}")))
    }

    /// Stops a container (SIGTERM, then SIGKILL after its stop timeout).
    pub async fn stop_container(&self, id: &str) -> Result<(), EngineError> {
        let endpoints = self.endpoints_before_stop(id).await;
        match self
            .client()
            .stop_container(id, Some(StopContainerOptionsBuilder::new().build()))
            .await
        {
            Ok(()) => {
                Self::forget(endpoints);
                Ok(())
            }
            // Already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(EngineError::Failed(format!("stopping container {id}: {e}"))),
        }
    }

    pub async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        self.client()
            .start_container(id, None)
            .await
            .map_err(|e| EngineError::Failed(format!("starting container {id}: {e}")))?;
        if matches!(self.target, crate::remote::Target::Local)
            && let Ok(c) = self.inspect(id).await
        {
            self.announce(&c);
        }
        Ok(())
    }

    /// Removes a container (stopping it first), with its anonymous volumes.
    pub async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        let endpoints = self.endpoints_before_stop(id).await;
        match self
            .client()
            .remove_container(
                id,
                Some(
                    RemoveContainerOptionsBuilder::new()
                        .force(true)
                        .v(true)
                        .build(),
                ),
            )
            .await
        {
            Ok(()) => {
                Self::forget(endpoints);
                Ok(())
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(EngineError::Failed(format!("removing container {id}: {e}"))),
        }
    }

    /// Waits until the container is ready by `health`, or `timeout` passes (an error saying
    /// what was seen last). A container that stops is not waited for.
    pub async fn wait_healthy(
        &self,
        id: &str,
        health: &Health,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        if matches!(health, Health::Http { .. })
            && let Some(why) = self.http_probe_refusal()
        {
            return Err(EngineError::Failed(why));
        }
        let until = Instant::now() + timeout;
        let mut last: String;
        // A first answer can hang on the engine's side: the port proxy accepts at once, and its
        // own connection into a container whose network is not quite up waits out a SYN
        // retransmit (a second). A new probe gets a new connection: each waits 200 ms, twice
        // that the next time, up to 2 s for a service that is slow to answer.
        let mut patience = Duration::from_millis(200);
        loop {
            let c = self.inspect(id).await?;
            let published = published_ports(&c);
            let state = c.state.unwrap_or_default();
            if state.running != Some(true) {
                return Err(EngineError::Failed(format!(
                    "the container stopped (exit code {})",
                    state.exit_code.unwrap_or(-1)
                )));
            }
            match health {
                Health::Running => {
                    let up = state
                        .started_at
                        .as_deref()
                        .and_then(elapsed_since)
                        .unwrap_or_default();
                    if up >= Duration::from_millis(300) {
                        return Ok(());
                    }
                    last = "running for less than 300ms".into();
                }
                Health::Image => match state.health.and_then(|h| h.status) {
                    Some(bollard::models::HealthStatusEnum::HEALTHY) => return Ok(()),
                    Some(s) => last = format!("its HEALTHCHECK says {s}"),
                    None => {
                        return Err(EngineError::Failed(
                            "the image has no HEALTHCHECK: give `health` a port and path".into(),
                        ));
                    }
                },
                Health::Http { port, path, status } => {
                    match published.iter().find(|(c, _)| c == port) {
                        None => {
                            return Err(EngineError::Failed(format!(
                                "port {port} is not published (add it to `ports`)"
                            )));
                        }
                        Some((_, host)) => match self.probe(*host, path, patience).await {
                            Ok(got) if got == *status => return Ok(()),
                            Ok(got) => last = format!("GET {path} answered {got}"),
                            Err(e) => last = format!("GET {path}: {e}"),
                        },
                    }
                }
            }
            if Instant::now() >= until {
                return Err(EngineError::Failed(format!(
                    "not healthy within {}s ({last})",
                    timeout.as_secs_f64()
                )));
            }
            patience = (patience * 2).min(Duration::from_secs(2));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A container's published ports, (container, host), from its inspection.
fn published_ports(c: &bollard::models::ContainerInspectResponse) -> Vec<(u16, u16)> {
    let mut ports = Vec::new();
    let bound = c.network_settings.as_ref().and_then(|n| n.ports.as_ref());
    for (key, binds) in bound.into_iter().flatten() {
        let Some(container) = key.split('/').next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        for b in binds.iter().flatten() {
            if let Some(host) = b.host_port.as_ref().and_then(|h| h.parse().ok()) {
                ports.push((container, host));
            }
        }
    }
    ports.sort();
    ports.dedup();
    ports
}

/// How long ago an RFC 3339 time of the engine's was (the engine's clock is this machine's).
fn elapsed_since(text: &str) -> Option<Duration> {
    let at = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
        .to_std()
        .ok()
}

impl Engine {
    /// One GET to `path` on the engine's host's 127.0.0.1:`port` (where services are
    /// published), made from that host, answered within `wait`: the status. The local engine
    /// and a `tcp://` engine on this machine's loopback: directly; an `ssh://` engine: through
    /// `ssh -W`, so the connection starts on the engine's host.
    async fn probe(&self, port: u16, path: &str, wait: Duration) -> Result<u16, String> {
        let authority = format!("127.0.0.1:{port}");
        let get = async {
            match &self.target {
                crate::remote::Target::Ssh(ssh) => {
                    let (pipes, _child) = ssh
                        .connect_from_host(&authority)
                        .map_err(|e| e.to_string())?;
                    crate::http::get_status_over(pipes, &authority, path).await
                }
                _ => crate::http::get_status(&authority, &authority, path).await,
            }
        };
        tokio::time::timeout(wait, get)
            .await
            .map_err(|_| format!("no answer within {} ms", wait.as_millis()))?
    }

    /// Why an HTTP probe cannot be made from this engine's host, if it cannot: a `tcp://`
    /// engine on another machine gives no way onto its host (its services are published on
    /// that host's loopback).
    pub fn http_probe_refusal(&self) -> Option<String> {
        match &self.target {
            crate::remote::Target::Tls { host, .. }
                if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]")
                    && !host.starts_with("127.") =>
            {
                Some(format!(
                    "an HTTP health probe must run on the engine's host, and a tcp:// engine ({}) gives no way onto it: use the image's HEALTHCHECK (`health` without `port`), or reach the engine over ssh://",
                    self.endpoint
                ))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_times() {
        let past = elapsed_since("2020-01-01T00:00:00.5Z").expect("past");
        assert!(past > Duration::from_secs(3600 * 24 * 365));
        assert!(elapsed_since("not a time").is_none());
    }
}
