//! `docker/build` and `docker/push` on the worker's local engine, through `skiff_docker`. What a
//! build makes is in the resources ledger before it exists (an intent), labelled with its run at
//! the source, and marked live with the engine's ID once built.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use skiff_core::actions::Val;
use skiff_core::actions::docker::{Build, BuildOutputs, BuildWith, Push, PushOutputs, PushWith};
use skiff_core::config::{Config, RegistryKind};
use skiff_core::ledger::{NewResource, ResourceState, ResourceUpdate};
use skiff_docker::{BuildSpec, Credentials, Engine, EngineError, Lines};

use super::{ActionContext, ActionError, Execute};
use crate::secrets::Secrets;

/// What the worker's actions reach beyond the run: skiff's config (registries, with their
/// passwords from the worker's secrets) and the local Docker engine (connected on first use).
#[derive(Default)]
pub struct Tools {
    config: Config,
    credentials: HashMap<String, Credentials>,
    engine: tokio::sync::OnceCell<Engine>,
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
        Ok(Tools {
            config,
            credentials,
            engine: Default::default(),
        })
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
        let mut labels = strings(&with.labels)?;
        // Labelled at the source with the run that made it, so a lost record can be rebuilt.
        labels.insert("skiff.run".into(), cx.run.to_string());
        labels.insert("skiff.pipeline".into(), cx.pipeline.to_string());
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
