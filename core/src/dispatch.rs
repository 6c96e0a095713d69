//! Starting runs: check that the pipeline accepts the trigger, check the params, create the run
//! in the Store, push its job on the queue. Every way in (the API, the UI's Run button, `skiff
//! run`, webhooks, schedules) comes through [`new_run`], so the rules are the same for all.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::catalog::Entry;
use crate::pipeline::Pipeline;
use crate::pipeline::{ParamError, resolve_params};
use crate::run::{NewRun, Run, RunId, Trigger, TriggerKind};
use crate::store::{Store, StoreError};

/// The job format this build writes and reads ([`RunJob::v`]). A worker takes jobs of its own
/// version only: the distributed queue keeps each version's jobs apart, so a worker of an older
/// build never meets a job it cannot read.
pub const JOB_VERSION: u32 = 1;

/// The job a queue carries: which run to execute, the labels a worker needs to take it, and
/// when it was pushed (for the queue-wait metric).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunJob {
    /// The job format's version ([`JOB_VERSION`]; absent in jobs of builds before it: 1).
    #[serde(default = "first_job_version")]
    pub v: u32,
    pub run_id: String,
    /// Microseconds since the Unix epoch when the job was pushed.
    pub pushed_at_us: u64,
    /// The pipeline's `runs_on`, sorted and without repeats: a worker takes the job only if it
    /// has every one of these labels. Empty: any worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

fn first_job_version() -> u32 {
    1
}

impl RunJob {
    pub fn new(run: &RunId) -> Self {
        Self::with_labels(run, Vec::new())
    }

    /// A job for a run that needs workers with `labels` (a pipeline's `runs_on`).
    pub fn with_labels(run: &RunId, labels: Vec<String>) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        RunJob {
            v: JOB_VERSION,
            run_id: run.to_string(),
            pushed_at_us: u64::try_from(now.as_micros()).unwrap_or(u64::MAX),
            labels: labels_of(labels),
        }
    }
}

/// How a secret a pipeline uses is named among the labels a run needs (`secret:NAME`): a run
/// goes only to a worker that holds every secret its steps use.
pub const SECRET_LABEL: &str = "secret:";

/// What a worker needs to take a run of `pipeline`: its `runs_on` labels and, as `secret:NAME`,
/// each secret its steps use; sorted, without repeats.
pub fn needs(pipeline: &Pipeline) -> Vec<String> {
    labels_of(
        pipeline
            .runs_on
            .iter()
            .cloned()
            .chain(
                pipeline
                    .secrets
                    .iter()
                    .map(|s| format!("{SECRET_LABEL}{s}")),
            )
            .collect(),
    )
}

/// What a worker offers: its labels and, as `secret:NAME`, each secret it holds.
pub fn offers<'a>(
    labels: impl IntoIterator<Item = &'a String>,
    secrets: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeSet<String> {
    labels
        .into_iter()
        .cloned()
        .chain(secrets.into_iter().map(|s| format!("{SECRET_LABEL}{s}")))
        .collect()
}

/// Says what a run that needs `needs` waits for: "a worker with labels aws, docker and the
/// secrets DEPLOY_KEY".
pub fn describe_needs(needs: &[String]) -> String {
    let (secrets, labels): (Vec<&String>, Vec<&String>) =
        needs.iter().partition(|n| n.starts_with(SECRET_LABEL));
    let list =
        |v: &[&String], strip: usize| v.iter().map(|s| &s[strip..]).collect::<Vec<_>>().join(", ");
    match (labels.is_empty(), secrets.is_empty()) {
        (true, true) => "a worker (none is alive)".to_string(),
        (false, true) => format!("a worker with labels {}", list(&labels, 0)),
        (true, false) => format!(
            "a worker holding the secrets {}",
            list(&secrets, SECRET_LABEL.len())
        ),
        (false, false) => format!(
            "a worker with labels {} holding the secrets {}",
            list(&labels, 0),
            list(&secrets, SECRET_LABEL.len())
        ),
    }
}

/// A label set in its one spelling: sorted, without repeats (the distributed queue's name for it).
pub fn labels_of(mut labels: Vec<String>) -> Vec<String> {
    labels.sort();
    labels.dedup();
    labels
}

#[derive(Debug, thiserror::Error)]
#[error("queue: {0}")]
pub struct QueueError(pub String);

/// Where jobs go to be picked up by workers.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Pushes a job; it is durable when this returns.
    async fn push(&self, job: RunJob) -> Result<(), QueueError>;
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("pipeline `{0}` is not valid")]
    InvalidPipeline(String),
    #[error("pipeline `{pipeline}` does not accept {} runs ({hint})", kind.as_str())]
    NotAccepted {
        pipeline: String,
        kind: TriggerKind,
        hint: &'static str,
    },
    #[error("the params do not fit the pipeline")]
    Params(Vec<ParamError>),
    #[error("the snapshot of run {0} no longer loads")]
    BadSnapshot(RunId),
    /// The pipeline's `concurrency:` could not be worked out for these params.
    #[error("pipeline `{pipeline}`: its concurrency group: {message}")]
    Group { pipeline: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Whether `pipeline` accepts runs started by `kind`; `Err` holds what its file says instead.
/// The Run button, the API and the CLI are manual runs (`on.manual`, on unless turned off); a
/// webhook needs `on.webhook`, a schedule `on.schedule`. A rerun repeats a run that was accepted
/// when it was made (the nightly teardown that failed can be run again by hand).
pub fn accepts(pipeline: &Pipeline, kind: TriggerKind) -> Result<(), &'static str> {
    let on = &pipeline.on;
    match kind {
        TriggerKind::Manual | TriggerKind::Api | TriggerKind::Cli if !on.manual => {
            Err("on.manual: false")
        }
        TriggerKind::Webhook if on.webhook.is_none() => Err("it has no on.webhook"),
        TriggerKind::Schedule if on.schedules.is_empty() => Err("it has no on.schedule"),
        _ => Ok(()),
    }
}

/// The run a trigger asks for, once the pipeline accepts the trigger and the params fit; the one
/// place these rules are applied.
pub fn new_run(
    entry: &Entry,
    given: &BTreeMap<String, String>,
    trigger: Trigger,
) -> Result<NewRun, DispatchError> {
    let pipeline = entry
        .pipeline
        .as_ref()
        .ok_or_else(|| DispatchError::InvalidPipeline(entry.name.clone()))?;
    accepts(pipeline, trigger.kind).map_err(|hint| DispatchError::NotAccepted {
        pipeline: pipeline.name.clone(),
        kind: trigger.kind,
        hint,
    })?;
    let params = resolve_params(pipeline, given).map_err(DispatchError::Params)?;
    Ok(NewRun {
        pipeline: pipeline.name.clone(),
        trigger,
        group: group_of(pipeline, &params)?,
        labels: needs(pipeline),
        params,
        source: entry.source.clone(),
        steps: pipeline.plan(),
        rerun_of: None,
        idempotency_key: None,
    })
}

/// The concurrency group of a run of `pipeline` with `params`: its `concurrency:` evaluated
/// (with the params only: the server holds no secrets and runs no step).
pub fn group_of(
    pipeline: &Pipeline,
    params: &BTreeMap<String, String>,
) -> Result<Option<String>, DispatchError> {
    struct Params<'a>(&'a Pipeline, &'a BTreeMap<String, String>);
    impl crate::expr::Scope for Params<'_> {
        fn lookup(&self, path: &[String]) -> Result<crate::expr::Value, crate::expr::EvalError> {
            let name = path.get(1).map(String::as_str).unwrap_or("");
            match path.first().map(String::as_str) {
                Some("params") => {
                    let given = self.1.get(name).map(String::as_str);
                    Ok(match self.0.param(name) {
                        Some(p) => p.typed(given),
                        None => given.map_or(crate::expr::Value::Null, |v| {
                            crate::expr::Value::String(v.to_string())
                        }),
                    })
                }
                _ => Err(crate::expr::EvalError(format!(
                    "`{}` is not known when a run is made: a concurrency group can use params only",
                    path.join(".")
                ))),
            }
        }
        fn failed(&self) -> bool {
            false
        }
        fn cancelled(&self) -> bool {
            false
        }
    }
    let Some(template) = &pipeline.concurrency else {
        return Ok(None);
    };
    let group = template
        .eval_string(&Params(pipeline, params))
        .map_err(|e| DispatchError::Group {
            pipeline: pipeline.name.clone(),
            message: e.0,
        })?;
    let group = group.trim();
    if group.is_empty() || group.len() > 200 {
        return Err(DispatchError::Group {
            pipeline: pipeline.name.clone(),
            message: format!("`{group}` is not a group name (1 to 200 characters)"),
        });
    }
    Ok(Some(group.to_string()))
}

/// What a built-in service run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAction {
    Stop,
    Start,
}

#[derive(Clone)]
pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
}

impl Dispatcher {
    /// Starts a run of a catalog entry with the given params.
    pub async fn trigger(
        &self,
        entry: &Entry,
        given: &BTreeMap<String, String>,
        trigger: Trigger,
    ) -> Result<Run, DispatchError> {
        self.start(new_run(entry, given, trigger)?).await
    }

    /// Starts a run once per `key` (a webhook delivery, a schedule's slot): a key the pipeline
    /// has seen answers the run it made, with `created: false`, and pushes nothing.
    pub async fn trigger_once(
        &self,
        entry: &Entry,
        given: &BTreeMap<String, String>,
        trigger: Trigger,
        key: String,
    ) -> Result<crate::store::Created, DispatchError> {
        let mut new = new_run(entry, given, trigger)?;
        new.idempotency_key = Some(key);
        self.create_and_push(new).await
    }

    /// Starts a run of the current pipeline with the given params, recorded as a rerun of
    /// `earlier` ("Run again with changes...": the pipeline as it is now, not the snapshot).
    pub async fn trigger_as_rerun(
        &self,
        entry: &Entry,
        given: &BTreeMap<String, String>,
        trigger: Trigger,
        earlier: &Run,
    ) -> Result<Run, DispatchError> {
        let mut new = new_run(entry, given, trigger)?;
        new.rerun_of = Some(earlier.id.clone());
        self.start(new).await
    }

    /// Starts a new run with the same pipeline snapshot and params as `run`.
    pub async fn rerun(&self, run: &Run, trigger: Trigger) -> Result<Run, DispatchError> {
        let pipeline = crate::pipeline::load(&run.source, &run.pipeline)
            .map_err(|_| DispatchError::BadSnapshot(run.id.clone()))?;
        self.start(NewRun {
            pipeline: run.pipeline.clone(),
            trigger,
            group: group_of(&pipeline, &run.params)?,
            labels: needs(&pipeline),
            params: run.params.clone(),
            source: run.source.clone(),
            steps: pipeline.plan(),
            rerun_of: Some(run.id.clone()),
            idempotency_key: None,
        })
        .await
    }

    /// Starts a built-in run that stops or starts a service (trigger `service`): the pipeline
    /// `service-NAME`, one `docker/stop` or `docker/start` step, recorded and shown like any run.
    pub async fn service_run(
        &self,
        service: &crate::actions::docker::ServiceName,
        action: ServiceAction,
        actor: String,
    ) -> Result<Run, DispatchError> {
        let name = &service.0;
        let (uses, what) = match action {
            ServiceAction::Stop => ("docker/stop", "Stop"),
            ServiceAction::Start => ("docker/start", "Start"),
        };
        // The name is checked (a-z 0-9 -): nothing else goes into this text.
        let pipeline = format!("service-{name}");
        let source = format!(
            "name: {pipeline}\ndescription: {what} the service {name} (from the Services view).\non:\n  manual: false\nsteps:\n  - name: {what} {name}\n    uses: {uses}\n    with:\n      name: {name}\n"
        );
        let loaded = crate::pipeline::load(&source, &pipeline)
            .map_err(|_| DispatchError::InvalidPipeline(pipeline.clone()))?;
        self.start(NewRun {
            pipeline,
            trigger: Trigger {
                kind: TriggerKind::Service,
                actor,
            },
            group: None,
            labels: needs(&loaded),
            params: BTreeMap::new(),
            source,
            steps: loaded.plan(),
            rerun_of: None,
            idempotency_key: None,
        })
        .await
    }

    async fn start(&self, new: NewRun) -> Result<Run, DispatchError> {
        Ok(self.create_and_push(new).await?.run)
    }

    async fn create_and_push(&self, new: NewRun) -> Result<crate::store::Created, DispatchError> {
        let labels = new.labels.clone();
        let created = self.store.create_run(new).await?;
        if !created.created || created.queued || created.run.held {
            // Its job was pushed when it was created, or written with it; a held run gets its
            // job from the Store when its group lets it go.
            return Ok(created);
        }
        let run = &created.run;
        if let Err(e) = self.queue.push(RunJob::with_labels(&run.id, labels)).await {
            // The run would wait forever: record why it never started.
            let _ = self
                .store
                .request_cancel(&run.id, &format!("could not be queued: {e}"))
                .await;
            return Err(e.into());
        }
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_needs_its_labels_and_the_secrets_its_steps_use_but_not_the_hooks() {
        let p = crate::pipeline::load(
            "runs_on: [linux, docker]\non:\n  webhook:\n    hook: h\n    secret: ${{ secrets.HOOK }}\nenv:\n  A: ${{ secrets.TOKEN }}\nsteps:\n  - run: echo\n    env:\n      K: ${{ secrets.DEPLOY_KEY }}\n",
            "p",
        )
        .expect("valid");
        assert_eq!(
            needs(&p),
            ["docker", "linux", "secret:DEPLOY_KEY", "secret:TOKEN"]
        );
        assert_eq!(
            describe_needs(&needs(&p)),
            "a worker with labels docker, linux holding the secrets DEPLOY_KEY, TOKEN"
        );
        let offered = offers(&["linux".to_string(), "docker".to_string()], ["TOKEN"]);
        assert!(!needs(&p).iter().all(|n| offered.contains(n)));
    }

    #[test]
    fn each_trigger_kind_needs_its_trigger_in_the_file() {
        let load = |on: &str| {
            crate::pipeline::load(&format!("{on}steps:\n  - run: echo\n"), "p").expect("valid")
        };
        let plain = load("");
        let nightly = load("on:\n  manual: false\n  schedule: [{ cron: \"0 3 * * *\" }]\n");
        use TriggerKind::*;
        for kind in [Manual, Api, Cli, Rerun] {
            assert!(accepts(&plain, kind).is_ok(), "{kind:?}");
        }
        assert!(accepts(&plain, Webhook).is_err() && accepts(&plain, Schedule).is_err());
        for kind in [Manual, Api, Cli, Webhook] {
            assert!(accepts(&nightly, kind).is_err(), "{kind:?}");
        }
        assert!(accepts(&nightly, Schedule).is_ok() && accepts(&nightly, Rerun).is_ok());
    }
}
