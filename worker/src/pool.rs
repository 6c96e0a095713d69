//! Taking runs from the queue: the job handler every worker (in-process or remote) uses.

use std::sync::Arc;
use std::time::Duration;

use skiff_core::dispatch::RunJob;
use skiff_core::pipeline::Pipeline;
use skiff_core::run::{Run, RunId, RunStatus, StepRecord};
use skiff_core::store::{ChangeKind, Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::logs::RunObserver;
use crate::runner::{RunOptions, RunnerError, execute_run};
use crate::secrets::Secrets;

/// How a worker executes the jobs it takes.
#[derive(Clone)]
pub struct WorkerConfig {
    pub workspace_root: std::path::PathBuf,
    /// What the steps run as.
    pub isolation: crate::isolation::Isolation,
    /// Whether pipelines with `permissions: [docker]` get the Docker socket.
    pub allow_docker_steps: bool,
    /// Empty run folders kept for the next runs.
    pub spares: Arc<crate::isolation::SpareDirs>,
    /// skiff's config and the engines actions reach.
    pub tools: Arc<crate::actions::Tools>,
    pub kill_grace: Duration,
    pub secrets: Secrets,
    /// How often a running run checks the Store for a cancel request it was not told about.
    pub cancel_check: Duration,
    /// This worker's name in the runs it claims.
    pub name: String,
    /// How long its claims hold unless renewed (they are renewed every third of it).
    pub lease: Duration,
}

/// An infrastructure failure while handling a job (a failed run is not one).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("bad job: {0}")]
    BadJob(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

struct Quiet;

impl RunObserver for Quiet {
    fn log(&self, _step: Option<u32>, _data: &[u8]) {}
    fn step_changed(&self, step: &StepRecord) {
        if let (Some(a), Some(b)) = (step.started_at, step.finished_at) {
            let took = (b - a).to_std().unwrap_or_default();
            metrics::histogram!("skiff_step_duration_seconds", "status" => step.status.as_str())
                .record(took.as_secs_f64());
        }
    }
}

/// How a worker's runs are stopped when the worker stops.
#[derive(Clone, Default)]
pub struct Stopping {
    /// Cancels every run (their `finally` steps still run).
    pub cancel: CancellationToken,
    /// Stops the `finally` steps too (when they have had long enough).
    pub abort: CancellationToken,
    /// The runs in progress, and their ends still being written after their slots were freed
    /// (see [`RunOptions::end_behind`]): a stopping worker waits for them (and their finally
    /// steps), not for the queue worker's own shutdown.
    pub running: tokio_util::task::TaskTracker,
}

impl Stopping {
    fn options(&self, config: &WorkerConfig) -> RunOptions {
        RunOptions {
            workspace_root: config.workspace_root.clone(),
            isolation: config.isolation.clone(),
            allow_docker_steps: config.allow_docker_steps,
            keep_workspace: false,
            spares: config.spares.clone(),
            tools: config.tools.clone(),
            kill_grace: config.kill_grace,
            secrets: config.secrets.clone(),
            cancel: self.cancel.child_token(),
            abort: self.abort.child_token(),
            cancel_reason: "cancelled: skiff was stopping".into(),
            abort_reason:
                "cancelled: skiff stopped, and stopped the finally steps that were still running"
                    .into(),
            lease: config.lease,
            store_patience: crate::runner::DEFAULT_STORE_PATIENCE,
            end_behind: Some(self.running.clone()),
        }
    }
}

/// Executes the run a job names. A run that is no longer queued (cancelled before it started,
/// or already taken) is left alone, so a job delivered twice runs once.
pub async fn handle_job(
    store: Arc<dyn Store>,
    job: RunJob,
    config: &WorkerConfig,
    stopping: &Stopping,
) -> Result<RunStatus, JobError> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    metrics::histogram!("skiff_queue_wait_seconds")
        .record(now_us.saturating_sub(job.pushed_at_us) as f64 / 1e6);
    let id: RunId = job.run_id.parse().map_err(JobError::BadJob)?;
    // Claiming the run is one atomic move (queued -> running), so a job delivered twice runs
    // once, and a run cancelled while queued never starts.
    let (run, claim) = match store.claim_run(&id, &config.name, config.lease).await {
        Ok(claimed) => claimed,
        Err(StoreError::InvalidTransition { from, .. }) => return Ok(from),
        Err(StoreError::NotFound(_)) => {
            tracing::warn!(run_id = %id, "job for an unknown run; dropped");
            return Ok(RunStatus::Cancelled);
        }
        Err(e) => return Err(e.into()),
    };
    let Some(pipeline) = load_snapshot(store.as_ref(), &run, &claim).await? else {
        return Ok(RunStatus::Failed);
    };
    let opts = stopping.options(config);
    let watcher = tokio::spawn(watch_cancel(
        store.clone(),
        id.clone(),
        opts.cancel.clone(),
        config.cancel_check,
    ));
    let result = execute_run(
        store.clone(),
        &run,
        claim,
        &pipeline,
        &opts,
        Arc::new(Quiet),
    )
    .await;
    watcher.abort();
    let outcome = result?;
    metrics::counter!("skiff_runs_finished_total", "status" => outcome.status.as_str())
        .increment(1);
    Ok(outcome.status)
}

/// Ends a run that was `running` when its worker went away without finishing it, once `claim`
/// (taken over from that worker) holds it: see [`crate::runner::finish_interrupted`]. Its
/// leftover processes must have been ended first.
pub async fn finish_interrupted_run(
    store: Arc<dyn Store>,
    run: &Run,
    claim: skiff_core::store::Claim,
    config: &WorkerConfig,
    stopping: &Stopping,
    why: crate::runner::Interruption,
) -> Result<RunStatus, JobError> {
    let Some(pipeline) = load_snapshot(store.as_ref(), run, &claim).await? else {
        return Ok(RunStatus::Failed);
    };
    let opts = stopping.options(config);
    let outcome = crate::runner::finish_interrupted(
        store.clone(),
        run,
        claim,
        &pipeline,
        &opts,
        Arc::new(Quiet),
        why,
    )
    .await?;
    metrics::counter!("skiff_runs_finished_total", "status" => outcome.status.as_str())
        .increment(1);
    Ok(outcome.status)
}

/// The pipeline as snapshotted in the run. The snapshot loaded when the run was created; it
/// fails only if this worker's skiff reads pipelines differently: the run is then stored as
/// failed (instead of retried forever) and `None` returned.
async fn load_snapshot(
    store: &dyn Store,
    run: &Run,
    claim: &skiff_core::store::Claim,
) -> Result<Option<Pipeline>, JobError> {
    match skiff_core::pipeline::load(&run.source, &run.pipeline) {
        Ok(p) => Ok(Some(p)),
        Err(diags) => {
            let first = diags.first().map(|d| d.message.clone()).unwrap_or_default();
            store
                .finish_run(
                    claim,
                    &[],
                    RunStatus::Failed,
                    Some(&format!("this worker cannot load the pipeline: {first}")),
                )
                .await?;
            Ok(None)
        }
    }
}

/// Cancels `token` when the Store says the run's cancel was requested: at once when the Store
/// announces a change to the run, and at the latest after `every`.
async fn watch_cancel(store: Arc<dyn Store>, id: RunId, token: CancellationToken, every: Duration) {
    let mut changes = store.changes();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            changed = changes.recv() => match changed {
                Ok(c) if c.run() != Some(&id) || c.kind != ChangeKind::Cancel => continue,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => changes = store.changes(),
            },
            _ = tick.tick() => {}
        }
        match store.get_run(&id).await {
            Ok(Some(run)) if run.cancel_requested => {
                token.cancel();
                return;
            }
            Ok(Some(run)) if run.status.is_terminal() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(run_id = %id, error = %e, "checking for a cancel request failed")
            }
        }
    }
}
