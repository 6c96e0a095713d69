//! The `docker/*` actions on the worker's local engine, through `skiff_docker`: build, push,
//! deploy, stop, start, reap. What a build or a deploy makes is in the resources ledger before it
//! exists (an intent), labelled with its run at the source, and marked live with the engine's ID
//! once made.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use skiff_core::actions::Val;
use skiff_core::actions::docker::{
    Build, BuildOutputs, BuildWith, Deploy, DeployOutputs, DeployWith, Prune, PruneOutputs,
    PruneWith, Push, PushOutputs, PushWith, Reap, ReapOutputs, ReapWith, Start, StartOutputs,
    StartWith, Stop, StopOutputs, StopWith,
};
use skiff_core::config::{Config, RegistryKind};
use skiff_core::ledger::{NewResource, ResourceState, ResourceUpdate};
use skiff_docker::service::{ContainerSpec, Health, Port};
use skiff_docker::{
    BuildSpec, Credentials, Engine, EngineError, HostUrl, Lines, SshTarget, Target,
};

use super::{ActionContext, ActionError, Execute};
use crate::secrets::Secrets;

/// The remote engines `config` declares, by their `host` (in order), and how each is reached.
pub fn engine_targets(config: &Config) -> Result<BTreeMap<String, Target>, String> {
    let mut targets = BTreeMap::new();
    for e in &config.engines {
        let target = match skiff_docker::remote::parse_host(&e.host)? {
            HostUrl::Tcp { host, port } => Target::Tls {
                host,
                port,
                ca: e.tls_ca.clone().unwrap_or_default(),
                cert: e.tls_cert.clone().unwrap_or_default(),
                key: e.tls_key.clone().unwrap_or_default(),
            },
            HostUrl::Ssh { user, host, port } => Target::Ssh(SshTarget {
                user,
                host,
                port,
                key: e.ssh_key.clone(),
                known_hosts: e.known_hosts.clone().unwrap_or_default(),
            }),
        };
        targets.insert(e.host.clone(), target);
    }
    Ok(targets)
}

/// What the worker's actions reach beyond the run: skiff's config (registries, with their
/// passwords from the worker's secrets) and the local Docker engine (connected on first use).
#[derive(Default)]
pub struct Tools {
    config: Config,
    credentials: HashMap<String, Credentials>,
    engine: tokio::sync::OnceCell<Engine>,
    /// The remote engines the config declares, by their `host`, and those connected so far.
    targets: BTreeMap<String, Target>,
    remotes: tokio::sync::Mutex<HashMap<String, Engine>>,
}

impl std::fmt::Debug for Tools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tools")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Tools {
    /// The config, with every registry password found among `secrets`: a missing one is an error
    /// now, at start, not at the first push.
    pub fn new(config: Config, secrets: &Secrets) -> Result<Tools, String> {
        let mut credentials = HashMap::new();
        for r in &config.registries {
            let (Some(username), Some(secret)) = (&r.username, &r.password) else {
                continue;
            };
            let password = secrets.get(secret).ok_or_else(|| {
                format!(
                    "registry `{}`: its password is the secret {secret}, which skiff was not given (SKIFF_SECRET_{secret})",
                    r.name
                )
            })?;
            credentials.insert(
                r.name.clone(),
                Credentials {
                    username: username.clone(),
                    password: password.to_string(),
                },
            );
        }
        let targets = engine_targets(&config)?;
        Ok(Tools {
            config,
            credentials,
            engine: Default::default(),
            targets,
            remotes: Default::default(),
        })
    }

    /// The engine `host` names (one the config declares), or the local one: connected once
    /// and kept (a failed connect is tried again next time).
    pub async fn engine_at(&self, host: Option<&str>) -> Result<Engine, ActionError> {
        let Some(host) = host else {
            return self.engine().await.cloned();
        };
        let Some(target) = self.targets.get(host) else {
            let declared: Vec<&str> = self.targets.keys().map(String::as_str).collect();
            return Err(ActionError::refused(format!(
                "engine `{host}` is not declared in skiff's config (declared: {}); see [[engine]] in skiff.toml",
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            )));
        };
        let mut remotes = self.remotes.lock().await;
        if let Some(e) = remotes.get(host) {
            return Ok(e.clone());
        }
        let engine = Engine::connect(target.clone())
            .await
            .map_err(|e| ActionError::failed(e.to_string()))?;
        remotes.insert(host.to_string(), engine.clone());
        Ok(engine)
    }

    /// The engine whose ID the ledger recorded, reached the way the ledger says it was (its
    /// `engine` records), through the config's declaration of that host; the local one when
    /// it is that engine.
    async fn engine_by_id(&self, cx: &ActionContext<'_>, id: &str) -> Result<Engine, ActionError> {
        let local = self.engine().await;
        if let Ok(local) = &local
            && local.id == id
        {
            return Ok((*local).clone());
        }
        let reached = live_resources(
            cx,
            skiff_core::ledger::ResourceQuery {
                engine: Some(id.to_string()),
                ..Default::default()
            },
        )
        .await?;
        let hosts: Vec<String> = reached
            .into_iter()
            .filter(|r| r.kind == "engine")
            .map(|r| r.name)
            .collect();
        for host in &hosts {
            if self.targets.contains_key(host) {
                return self.engine_at(Some(host)).await;
            }
        }
        Err(ActionError::refused(format!(
            "engine {id} (reached as {}) is neither this worker's own nor declared in its config",
            if hosts.is_empty() {
                "nothing the ledger recorded".to_string()
            } else {
                hosts.join(", ")
            }
        )))
    }

    /// The local engine, connected once (a failed connect is tried again next time).
    pub async fn engine(&self) -> Result<&Engine, ActionError> {
        self.engine
            .get_or_try_init(Engine::local)
            .await
            .map_err(|e| ActionError::failed(e.to_string()))
    }
}

/// Build and push output into the step's log, masked.
struct StepLines<'a> {
    cx: &'a ActionContext<'a>,
}

impl Lines for StepLines<'_> {
    async fn line(&self, text: String) {
        self.cx.log.output_line(Some(self.cx.step), &text).await;
    }
}

fn engine_error(e: EngineError) -> ActionError {
    match e {
        // The engine said no to this input: the same input will fail again.
        EngineError::Failed(m) => ActionError::refused(m),
        e @ EngineError::Unreachable { .. } => ActionError::failed(e.to_string()),
    }
}

fn strings(map: &BTreeMap<String, Val<String>>) -> Result<HashMap<String, String>, ActionError> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), v.get().map_err(ActionError::Inputs)?.clone())))
        .collect()
}

/// A step's `labels`, and the run that makes the thing: labelled at the source, so a lost ledger
/// record can be rebuilt.
fn run_labels(
    given: &BTreeMap<String, Val<String>>,
    cx: &ActionContext<'_>,
) -> Result<HashMap<String, String>, ActionError> {
    let mut labels = strings(given)?;
    labels.insert("skiff.run".into(), cx.run.to_string());
    labels.insert("skiff.pipeline".into(), cx.pipeline.to_string());
    Ok(labels)
}

#[async_trait]
impl Execute for Build {
    async fn execute(with: BuildWith, cx: &ActionContext<'_>) -> Result<BuildOutputs, ActionError> {
        let context = Val::opt(&with.context)
            .map_err(ActionError::Inputs)?
            .map_or_else(|| ".".to_string(), |p| p.0);
        let dockerfile = Val::opt(&with.dockerfile)
            .map_err(ActionError::Inputs)?
            .map_or_else(|| "Dockerfile".to_string(), |p| p.0);
        let tags: Vec<String> = with
            .tags
            .iter()
            .map(|t| t.get().map(|t| t.0.clone()).map_err(ActionError::Inputs))
            .collect::<Result<_, _>>()?;
        let labels = run_labels(&with.labels, cx)?;
        let spec = BuildSpec {
            dockerfile: dockerfile.clone(),
            build_args: strings(&with.build_args)?,
            target: Val::opt(&with.target).map_err(ActionError::Inputs)?,
            tags: tags.clone(),
            labels,
            no_cache: Val::opt(&with.no_cache)
                .map_err(ActionError::Inputs)?
                .unwrap_or(false),
        };
        let engine = cx.tools.engine().await?;
        let workspace = cx.workspace.to_path_buf();
        let made = tokio::task::spawn_blocking(move || {
            skiff_docker::context::make(&workspace, &context, &dockerfile)
        })
        .await
        .map_err(|e| ActionError::failed(format!("making the build context: {e}")))?
        .map_err(|e| ActionError::refused(e.to_string()))?;
        let s = &made.summary;
        cx.note(&format!(
            "context: {} files, {} (sent to the engine at {})",
            s.files,
            human_bytes(s.bytes),
            engine.endpoint
        ))
        .await;
        if !s.skipped.is_empty() {
            cx.note(&format!(
                "left out of the context (not a file, folder or link): {}",
                s.skipped.join(", ")
            ))
            .await;
        }
        let record = format!("{}/{}/image", cx.run, cx.step_id);
        cx.record_resource(NewResource {
            id: record.clone(),
            kind: "image".into(),
            name: tags.first().cloned().unwrap_or_default(),
            engine: Some(engine.id.clone()),
            service: None,
            run: None,
            step: None,
            expires_at: None,
            hourly_price: None,
        })
        .await?;
        let lines = StepLines { cx };
        let image_id = tokio::select! {
            r = engine.build(made, &spec, &lines) => r.map_err(engine_error)?,
            // Dropping the request ends the build on the engine's side.
            () = cx.stop.cancelled() => return Err(ActionError::Stopped("the build was stopped".into())),
        };
        cx.update_resource(
            &record,
            &ResourceUpdate {
                state: Some(ResourceState::Live),
                external_id: Some(image_id.clone()),
                expires_at: None,
            },
        )
        .await?;
        Ok(BuildOutputs {
            image: tags.first().cloned().unwrap_or_default(),
            image_id,
        })
    }
}

#[async_trait]
impl Execute for Push {
    async fn execute(with: PushWith, cx: &ActionContext<'_>) -> Result<PushOutputs, ActionError> {
        let image = with.image.get().map_err(ActionError::Inputs)?.clone();
        let name = with.registry.get().map_err(ActionError::Inputs)?;
        let Some(registry) = cx.tools.config.registry(name) else {
            let declared: Vec<&str> = cx
                .tools
                .config
                .registries
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            return Err(ActionError::refused(format!(
                "registry `{name}` is not declared in skiff's config (declared: {})",
                if declared.is_empty() {
                    "none; see [[registry]] in skiff.toml".to_string()
                } else {
                    declared.join(", ")
                }
            )));
        };
        if registry.kind == RegistryKind::Ecr {
            return Err(ActionError::refused(format!(
                "registry `{name}` is an ECR registry: pushing to ECR comes with skiff's AWS support"
            )));
        }
        let repository = match Val::opt(&with.repository).map_err(ActionError::Inputs)? {
            Some(r) => r.0,
            None if image.starts_with("sha256:") => {
                return Err(ActionError::Inputs(
                    "`with.repository` is needed to push an image given by its ID".into(),
                ));
            }
            // The image's own name and tag, without the registry it may already name.
            None => match image.split_once('/') {
                Some((host, rest)) if host.contains(['.', ':']) || host == "localhost" => {
                    rest.to_string()
                }
                _ => image.clone(),
            },
        };
        let target = format!("{}/{repository}", registry.url);
        let engine = cx.tools.engine().await?;
        engine.tag(&image, &target).await.map_err(engine_error)?;
        cx.note(&format!("pushing {target} to registry `{name}`"))
            .await;
        let lines = StepLines { cx };
        let digest = tokio::select! {
            r = engine.push(&target, &registry.url, cx.tools.credentials.get(name).cloned(), &lines) => r.map_err(engine_error)?,
            () = cx.stop.cancelled() => return Err(ActionError::Stopped("the push was stopped".into())),
        };
        Ok(PushOutputs {
            image: target,
            digest,
        })
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / (1 << 10) as f64),
        n => format!("{n} B"),
    }
}

impl Tools {
    /// The credentials of the declared registry an image reference names, if any.
    fn credentials_for(&self, image: &str) -> Option<Credentials> {
        let host = image.split_once('/')?.0;
        let registry = self.config.registries.iter().find(|r| r.url == host)?;
        self.credentials.get(&registry.name).cloned()
    }
}

/// The ledger's live records that `query` picks (its `states` are set here).
async fn live_resources(
    cx: &ActionContext<'_>,
    query: skiff_core::ledger::ResourceQuery,
) -> Result<Vec<skiff_core::ledger::Resource>, ActionError> {
    cx.rec
        .store()
        .resources(&skiff_core::ledger::ResourceQuery {
            states: vec![ResourceState::Live],
            ..query
        })
        .await
        .map_err(|e| ActionError::failed(format!("reading the resources ledger: {e}")))
}

/// The ledger records of a service's containers that are live, by container ID.
async fn live_records(
    cx: &ActionContext<'_>,
    service: &str,
) -> Result<HashMap<String, String>, ActionError> {
    let found = live_resources(
        cx,
        skiff_core::ledger::ResourceQuery {
            service: Some(service.to_string()),
            ..Default::default()
        },
    )
    .await?;
    Ok(found
        .into_iter()
        .filter(|r| r.kind == "container")
        .filter_map(|r| Some((r.external_id?, r.id)))
        .collect())
}

async fn mark(cx: &ActionContext<'_>, record: &str, state: ResourceState, external: Option<&str>) {
    let update = ResourceUpdate {
        state: Some(state),
        external_id: external.map(str::to_string),
        expires_at: None,
    };
    if let Err(e) = cx.update_resource(record, &update).await {
        cx.note(&format!("the resources ledger: {e}")).await;
    }
}

#[async_trait]
impl Execute for Deploy {
    async fn execute(
        with: DeployWith,
        cx: &ActionContext<'_>,
    ) -> Result<DeployOutputs, ActionError> {
        let input = |e: String| ActionError::Inputs(e);
        let service = with.name.get().map_err(input)?.0.clone();
        let image = with.image.get().map_err(input)?.clone();
        let ports: Vec<Port> = with
            .ports
            .iter()
            .map(|p| {
                p.get().map(|p| Port {
                    container: p.container,
                    host: p.host,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(input)?;
        let env: Vec<(String, String)> = strings(&with.env)?.into_iter().collect();
        let mut labels = run_labels(&with.labels, cx)?;
        let health_timeout = match &with.health {
            Some(h) => Val::opt(&h.timeout).map_err(input)?.map(|d| d.0),
            None => None,
        }
        .unwrap_or(DeployWith::DEFAULT_HEALTH_TIMEOUT);
        let health = match &with.health {
            Some(h) => match Val::opt(&h.port).map_err(input)? {
                Some(port) => Health::Http {
                    port,
                    path: Val::opt(&h.path)
                        .map_err(input)?
                        .unwrap_or_else(|| "/".into()),
                    status: Val::opt(&h.status).map_err(input)?.map_or(200, |s| s.0),
                },
                None => Health::Image,
            },
            None => Health::Running,
        };
        let expires_at = Val::opt(&with.ttl)
            .map_err(input)?
            .and_then(|d| chrono::TimeDelta::from_std(d.0).ok())
            .map(|d| chrono::Utc::now() + d);
        if let Some(at) = expires_at {
            labels.insert("skiff.expires-at".into(), at.to_rfc3339());
        }
        let name = format!("{service}-{}-{}", cx.run_number, cx.attempt);
        let spec = ContainerSpec {
            service: service.clone(),
            name: name.clone(),
            image: image.clone(),
            ports: ports.clone(),
            env,
            labels,
            restart: Some(
                Val::opt(&with.restart)
                    .map_err(input)?
                    .map_or("unless-stopped", |r| r.as_str())
                    .to_string(),
            ),
            memory_bytes: Val::opt(&with.memory).map_err(input)?.map(|m| m.0),
            nano_cpus: Val::opt(&with.cpus)
                .map_err(input)?
                .map(|c| (c * 1e9) as i64),
            init: Val::opt(&with.init).map_err(input)?.unwrap_or(true),
            stop_signal: Val::opt(&with.stop_signal).map_err(input)?,
            stop_timeout: Val::opt(&with.stop_timeout)
                .map_err(input)?
                .map(|d| d.0.as_secs() as i64),
            secret_files: with
                .secrets
                .iter()
                .map(|(k, v)| Ok((k.0.clone(), v.get().map_err(input)?.clone())))
                .collect::<Result<_, ActionError>>()?,
        };
        let host = Val::opt(&with.host).map_err(input)?.map(|h| h.0);
        let engine = &cx.tools.engine_at(host.as_deref()).await?;
        record_engine(cx, engine).await?;
        if !engine.is_local() {
            cx.note(&format!(
                "deploying on {} (engine {})",
                engine.endpoint, engine.id
            ))
            .await;
        }
        let lines = StepLines { cx };
        if !engine.has_image(&image).await {
            cx.note(&format!("pulling {image}")).await;
            engine
                .pull(&image, cx.tools.credentials_for(&image), &lines)
                .await
                .map_err(engine_error)?;
        }
        // A container left by an earlier try of this very attempt goes first.
        engine.remove_container(&name).await.map_err(engine_error)?;
        let old: Vec<_> = engine
            .service_containers(&service)
            .await
            .map_err(engine_error)?
            .into_iter()
            .filter(|c| c.running && c.name != name)
            .collect();
        let records = live_records(cx, &service).await?;
        let record = format!("{}/{}/container/{}", cx.run, cx.step_id, cx.attempt);
        cx.record_resource(NewResource {
            id: record.clone(),
            kind: "container".into(),
            name: name.clone(),
            engine: Some(engine.id.clone()),
            service: Some(service.clone()),
            run: None,
            step: None,
            expires_at,
            hourly_price: None,
        })
        .await?;
        // Old and new side by side when no host port is fixed; otherwise the old one stops
        // first and comes back if the new one never gets healthy.
        let fixed = ports.iter().any(|p| p.host.is_some());
        if fixed {
            for c in &old {
                cx.note(&format!(
                    "stopping {} (it holds the same host port)",
                    c.name
                ))
                .await;
                engine.stop_container(&c.id).await.map_err(engine_error)?;
            }
        }
        let started = std::time::Instant::now();
        let outcome = match engine.run_container(&spec).await {
            Ok(new) => {
                cx.note(&format!("started {name}; waiting until it is healthy"))
                    .await;
                let id = new.id.clone();
                let healthy = tokio::select! {
                    r = engine.wait_healthy(&id, &health, health_timeout) => r,
                    () = cx.stop.cancelled() => Err(EngineError::Failed("stopped while waiting for health".into())),
                };
                match healthy {
                    // Its addresses as published now (a port the engine picked is known).
                    Ok(()) => engine.container(&id).await.map_err(|e| (Some(id), e)),
                    Err(e) => Err((Some(id), e)),
                }
            }
            Err(e) => Err((None, e)),
        };
        match outcome {
            Ok(new) => {
                mark(cx, &record, ResourceState::Live, Some(&new.id)).await;
                // The version this deploy made current: the service owns its image (prune
                // keeps a service's current and previous ones).
                let version = format!("{}/{}/service-image/{}", cx.run, cx.step_id, cx.attempt);
                let recorded = cx
                    .record_resource(NewResource {
                        id: version.clone(),
                        kind: "image".into(),
                        name: image.clone(),
                        engine: Some(engine.id.clone()),
                        service: Some(service.clone()),
                        run: None,
                        step: None,
                        expires_at,
                        hourly_price: None,
                    })
                    .await;
                match recorded {
                    Ok(_) => mark(cx, &version, ResourceState::Live, Some(&new.image_id)).await,
                    Err(e) => cx.note(&format!("the resources ledger: {e}")).await,
                }
                cx.note(&format!(
                    "{name} is healthy after {} ms",
                    started.elapsed().as_millis()
                ))
                .await;
                for c in &old {
                    engine.remove_container(&c.id).await.map_err(engine_error)?;
                    if let Some(r) = records.get(&c.id) {
                        mark(cx, r, ResourceState::Removed, None).await;
                    }
                    cx.note(&format!("removed the previous version, {}", c.name))
                        .await;
                }
                Ok(DeployOutputs {
                    addresses: addresses(&new.ports),
                    container_id: new.id,
                    container: name,
                })
            }
            Err((new_id, e)) => {
                if let Some(id) = &new_id {
                    let _ = engine.remove_container(id).await;
                }
                mark(cx, &record, ResourceState::Removed, new_id.as_deref()).await;
                let mut back = Vec::new();
                if fixed {
                    for c in &old {
                        // Back, and answering, before the step ends: the old version serves
                        // when the failure is reported.
                        let back_up = match engine.start_container(&c.id).await {
                            Ok(()) => engine.wait_healthy(&c.id, &health, health_timeout).await,
                            Err(e) => Err(e),
                        };
                        match back_up {
                            Ok(()) => back.push(c.name.clone()),
                            Err(e) => cx.note(&format!("bringing {} back: {e}", c.name)).await,
                        }
                    }
                }
                let previous = old
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                let rolled = if !back.is_empty() {
                    format!("; rolled back: {} serves again", back.join(", "))
                } else if old.is_empty() {
                    String::new()
                } else if fixed {
                    // Stopped for the new one, and it did not come back (the notes say why).
                    format!("; the previous version ({previous}) could not be brought back")
                } else {
                    format!("; the previous version ({previous}) still serves")
                };
                if cx.stop.is_cancelled() {
                    return Err(ActionError::Stopped(format!(
                        "the deploy of {name} was stopped{rolled}"
                    )));
                }
                Err(ActionError::refused(format!("{name}: {e}{rolled}")))
            }
        }
    }
}

/// Records how an engine was reached (kind `engine`: its ID, and its endpoint as the name), so
/// that a later step on any worker (Stop, Start, a `finally`) finds it again by the ID its
/// services' records carry. Recording it again answers the first record.
async fn record_engine(cx: &ActionContext<'_>, engine: &Engine) -> Result<(), ActionError> {
    let id = format!("engine/{}/{}", engine.id, engine.endpoint);
    let r = cx
        .record_resource(NewResource {
            id: id.clone(),
            kind: "engine".into(),
            name: engine.endpoint.clone(),
            engine: Some(engine.id.clone()),
            service: None,
            run: None,
            step: None,
            expires_at: None,
            hourly_price: None,
        })
        .await?;
    if r.state != ResourceState::Live {
        mark(cx, &id, ResourceState::Live, None).await;
    }
    Ok(())
}

/// The engines a service's live containers are on, by the ledger (the local one when the
/// ledger knows none).
async fn service_engines(
    cx: &ActionContext<'_>,
    service: &str,
) -> Result<Vec<Engine>, ActionError> {
    let found = live_resources(
        cx,
        skiff_core::ledger::ResourceQuery {
            service: Some(service.to_string()),
            ..Default::default()
        },
    )
    .await?;
    let mut ids: Vec<String> = found
        .into_iter()
        .filter(|r| r.kind == "container")
        .filter_map(|r| r.engine)
        .collect();
    ids.dedup();
    if ids.is_empty() {
        return Ok(vec![cx.tools.engine().await?.clone()]);
    }
    let mut engines = Vec::new();
    for id in ids {
        if !engines.iter().any(|e: &Engine| e.id == id) {
            engines.push(cx.tools.engine_by_id(cx, &id).await?);
        }
    }
    Ok(engines)
}

fn addresses(ports: &[(u16, u16)]) -> String {
    ports
        .iter()
        .map(|(_, host)| format!("http://127.0.0.1:{host}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[async_trait]
impl Execute for Stop {
    async fn execute(with: StopWith, cx: &ActionContext<'_>) -> Result<StopOutputs, ActionError> {
        let remove = Val::opt(&with.remove)
            .map_err(ActionError::Inputs)?
            .unwrap_or(false);
        let temporary = Val::opt(&with.temporary)
            .map_err(ActionError::Inputs)?
            .unwrap_or(false);
        let services = match Val::opt(&with.name).map_err(ActionError::Inputs)? {
            Some(name) => vec![name.0],
            None if temporary => temporary_services(cx).await?,
            None => {
                return Err(ActionError::Inputs(
                    "`temporary` is false and there is no `name`: nothing to stop".into(),
                ));
            }
        };
        if temporary && services.is_empty() {
            cx.note("no temporary services (deployed with a `ttl`) are live")
                .await;
        }
        let mut stopped = 0;
        for service in &services {
            stopped += stop_service(cx, service, remove).await?;
        }
        Ok(StopOutputs { stopped })
    }
}

/// The services the ledger holds live containers of, deployed with a `ttl`.
async fn temporary_services(cx: &ActionContext<'_>) -> Result<Vec<String>, ActionError> {
    let found = live_resources(cx, skiff_core::ledger::ResourceQuery::default()).await?;
    let mut services: Vec<String> = found
        .into_iter()
        .filter(|r| r.kind == "container" && r.expires_at.is_some())
        .filter_map(|r| r.service)
        .collect();
    services.sort();
    services.dedup();
    Ok(services)
}

/// Stops (and with `remove`, removes) a service's containers; how many were running.
async fn stop_service(
    cx: &ActionContext<'_>,
    service: &str,
    remove: bool,
) -> Result<u32, ActionError> {
    let records = if remove {
        live_records(cx, service).await?
    } else {
        HashMap::new()
    };
    let mut stopped = 0;
    let mut containers = Vec::new();
    for engine in service_engines(cx, service).await? {
        if !engine.is_local() {
            cx.note(&format!("on {} (engine {})", engine.endpoint, engine.id))
                .await;
        }
        for c in engine
            .service_containers(service)
            .await
            .map_err(engine_error)?
        {
            containers.push((engine.clone(), c));
        }
    }
    for (engine, c) in &containers {
        if c.running {
            engine.stop_container(&c.id).await.map_err(engine_error)?;
            cx.note(&format!("stopped {}", c.name)).await;
            stopped += 1;
        }
        if remove {
            engine.remove_container(&c.id).await.map_err(engine_error)?;
            if let Some(r) = records.get(&c.id) {
                mark(cx, r, ResourceState::Removed, None).await;
            }
            cx.note(&format!("removed {}", c.name)).await;
        }
    }
    if containers.is_empty() {
        cx.note(&format!(
            "service {service} has no containers on this engine"
        ))
        .await;
    }
    Ok(stopped)
}

#[async_trait]
impl Execute for Start {
    async fn execute(with: StartWith, cx: &ActionContext<'_>) -> Result<StartOutputs, ActionError> {
        let service = with.name.get().map_err(ActionError::Inputs)?.0.clone();
        // Its newest version, on the engine the ledger says it is on.
        let engine = &service_engines(cx, &service)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ActionError::refused(format!("service {service} has no engine")))?;
        let Some(latest) = engine
            .service_containers(&service)
            .await
            .map_err(engine_error)?
            .into_iter()
            .next()
        else {
            return Err(ActionError::refused(format!(
                "service {service} has no containers on this engine: deploy it first"
            )));
        };
        if latest.running {
            cx.note(&format!("{} is already running", latest.name))
                .await;
        } else {
            engine
                .start_container(&latest.id)
                .await
                .map_err(engine_error)?;
            cx.note(&format!("started {}", latest.name)).await;
        }
        let now = engine.container(&latest.id).await.map_err(engine_error)?;
        Ok(StartOutputs {
            container: now.name,
            addresses: addresses(&now.ports),
        })
    }
}

/// Every engine the ledger records that this worker reaches (its own, and the remote ones its
/// config declares), each once; the ones it cannot reach are noted in the log. None reached is
/// an error.
async fn known_engines(cx: &ActionContext<'_>) -> Result<Vec<Engine>, ActionError> {
    let records = live_resources(cx, skiff_core::ledger::ResourceQuery::default()).await?;
    let mut ids: Vec<String> = Vec::new();
    for id in records
        .into_iter()
        .filter(|r| r.kind == "engine")
        .filter_map(|r| r.engine)
    {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let mut engines: Vec<Engine> = Vec::new();
    let mut missed = None;
    match cx.tools.engine().await {
        Ok(local) => engines.push(local.clone()),
        Err(e) => {
            cx.note(&format!("skipping this worker's own engine: {e}"))
                .await;
            missed = Some(e);
        }
    }
    for id in ids {
        if engines.iter().any(|e| e.id == id) {
            continue;
        }
        match cx.tools.engine_by_id(cx, &id).await {
            Ok(engine) => engines.push(engine),
            Err(e) => {
                cx.note(&format!("skipping engine {id}: {e}")).await;
                missed = Some(e);
            }
        }
    }
    match (engines.is_empty(), missed) {
        (true, Some(e)) => Err(e),
        _ => Ok(engines),
    }
}

/// "" for the worker's own engine, " on HOST" for a remote one.
fn on(engine: &Engine) -> String {
    if engine.is_local() {
        String::new()
    } else {
        format!(" on {}", engine.endpoint)
    }
}

#[async_trait]
impl Execute for Reap {
    async fn execute(with: ReapWith, cx: &ActionContext<'_>) -> Result<ReapOutputs, ActionError> {
        let dry_run = Val::opt(&with.dry_run)
            .map_err(ActionError::Inputs)?
            .unwrap_or(false);
        let verb = if dry_run { "would remove" } else { "removed" };
        let mut removed = 0;
        for engine in known_engines(cx).await? {
            let reaped = crate::reap::reap(cx.rec.store().as_ref(), &engine, dry_run)
                .await
                .map_err(ActionError::failed)?;
            for r in &reaped {
                cx.note(&format!(
                    "{verb} {} {}{}: {}",
                    r.kind,
                    r.name,
                    on(&engine),
                    r.why
                ))
                .await;
            }
            removed += reaped.len() as u32;
        }
        Ok(ReapOutputs { removed })
    }
}

#[async_trait]
impl Execute for Prune {
    async fn execute(with: PruneWith, cx: &ActionContext<'_>) -> Result<PruneOutputs, ActionError> {
        let older_than = with.older_than.get().map_err(ActionError::Inputs)?.0;
        let dry_run = Val::opt(&with.dry_run)
            .map_err(ActionError::Inputs)?
            .unwrap_or(false);
        let verb = if dry_run { "would remove" } else { "removed" };
        let (mut removed, mut kept) = (0, 0);
        for engine in known_engines(cx).await? {
            let pruned = crate::reap::prune(cx.rec.store().as_ref(), &engine, older_than, dry_run)
                .await
                .map_err(ActionError::failed)?;
            for r in &pruned.removed {
                cx.note(&format!(
                    "{verb} {} {}{}: {}",
                    r.kind,
                    r.name,
                    on(&engine),
                    r.why
                ))
                .await;
            }
            removed += pruned.removed.len() as u32;
            kept += pruned.kept;
        }
        cx.note(&format!(
            "kept {kept} older thing(s) that a service owns (its current container, the images of its current and previous versions)"
        ))
        .await;
        Ok(PruneOutputs { removed, kept })
    }
}
