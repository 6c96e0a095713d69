//! Executing a run: its steps in order, their conditions, retries, timeouts and `finally`, with
//! every state change written to the Store as it happens.
//!
//! A failed step is data: it is stored with its reason and the run goes on to decide what runs
//! next. Only infrastructure faults (the Store, the workspace) are errors here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use skiff_core::duration::human;
use skiff_core::expr::{self, EvalError, Scope, Value};
use skiff_core::pipeline::{EnvVar, Permission, Phase, Pipeline, Step, StepAction, env_key};
use skiff_core::run::{Run, RunStatus, StepRecord, StepStatus};
use skiff_core::store::{Claim, Store, StoreError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::actions::{self, ActionContext};
use crate::isolation::{Isolation, RunDirs, RunUser, SpareDirs};
use crate::logs::{LogSender, Masker, RunObserver, start_writer};
use crate::process::{self, Ended, Spawn};
use crate::record::{Health, Recorder};
use crate::secrets::Secrets;

mod action;
mod scope;
mod script;

use scope::{RunScope, StepState};
pub use script::{MAX_OUTPUT_BYTES, MAX_OUTPUTS, clean_up_interrupted};

/// How long a `finally` step may take when it does not say.
pub const FINALLY_DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The longest pause between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Environment variables a step inherits from the worker; everything else is cleared, so the
/// worker's own credentials never reach a script.
const INHERITED_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM"];

pub struct RunOptions {
    /// Each run gets a workspace directory (named by its id) under this folder, with its HOME
    /// and TMPDIR beside it; its step files are kept here too, where no step can write.
    pub workspace_root: PathBuf,
    /// What the steps run as (see `isolation.rs`).
    pub isolation: Isolation,
    /// Whether pipelines that ask for `permissions: [docker]` get the Docker socket (root on
    /// the host: `--allow-docker-steps`).
    pub allow_docker_steps: bool,
    pub keep_workspace: bool,
    /// Empty run folders kept for the next runs (shared by every run of the process).
    pub spares: Arc<SpareDirs>,
    /// skiff's config and the engines actions reach.
    pub tools: Arc<crate::actions::Tools>,
    /// Time between SIGTERM and SIGKILL when a step is stopped.
    pub kill_grace: Duration,
    pub secrets: Secrets,
    /// Cancels the run: the current step is stopped and `finally` runs.
    pub cancel: CancellationToken,
    /// Stops everything, `finally` included (a second Ctrl-C, or a stop that waited long enough).
    pub abort: CancellationToken,
    /// The run's reason when `cancel` stopped it (a cancel requested through the Store records
    /// its own reason, which wins).
    pub cancel_reason: String,
    /// The run's reason when `abort` stopped its `finally` steps.
    pub abort_reason: String,
    /// How long the run's claim holds unless renewed; it is renewed every third of this.
    pub lease: Duration,
    /// How long a failed Store write is retried before the Store counts as away (the main
    /// steps stop, `finally` runs with its writes held back until the Store is back).
    pub store_patience: Duration,
    /// Where the run's end is written, when not before [`execute_run`] returns: a worker frees
    /// its slot for the next run once the steps are over, their processes ended and the
    /// folders cleared, while the end's write waits its turn on the Store (the run keeps its
    /// claim, renewed, until then). `None`: written before it returns.
    pub end_behind: Option<tokio_util::task::TaskTracker>,
}

/// How long a claim holds unless renewed.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// How long a failed Store write is retried.
pub const DEFAULT_STORE_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: RunStatus,
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("workspace {path}: {source}")]
    Workspace {
        path: String,
        source: std::io::Error,
    },
}

/// Why the main steps stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    Cancelled,
    TimedOut,
    /// The Store stayed away longer than the patience, or the run's claim was lost.
    StoreTrouble,
}

struct Runner<'a> {
    rec: Recorder,
    /// Stops `finally` steps: the caller's abort, or a lost claim.
    abort: CancellationToken,
    run: &'a Run,
    pipeline: &'a Pipeline,
    opts: &'a RunOptions,
    log: LogSender,
    masker: Masker,
    /// Its workspace, HOME and TMPDIR.
    dirs: RunDirs,
    /// The user the steps run as, when they run isolated; dropped (its uid free again) after
    /// the run's processes are gone.
    user: Option<RunUser>,
    /// A group the run's user is given on purpose (the Docker socket's).
    extra_group: Option<u32>,
    base_env: Vec<(String, String)>,
    steps: HashMap<String, StepState>,
    records: Vec<StepRecord>,
    failed: bool,
    first_failure: Option<String>,
    interrupt: Option<Interrupt>,
    /// Stops main steps: fired by a cancel or by the run's deadline.
    stop: CancellationToken,
    deadline_hit: Arc<AtomicBool>,
    deadline: Instant,
    /// Where the run's step processes are tracked (its cgroup), so they end with their step.
    tracker: process::RunTracker,
}

/// Executes `run`, which `claim` holds, to its end and stores its final state. Every write
/// carries the claim; the claim's lease is renewed while the run goes on.
pub async fn execute_run(
    store: Arc<dyn Store>,
    run: &Run,
    claim: Claim,
    pipeline: &Pipeline,
    opts: &RunOptions,
    observer: Arc<dyn RunObserver>,
) -> Result<RunOutcome, RunnerError> {
    drive(store, run, claim, pipeline, opts, observer, None).await
}

/// Ends a run that skiff stopped in the middle of (a crash, a kill -9), the way a run ends: the
/// records of its unfinished main steps are ended truthfully, its `finally` steps that had not
/// ended run now (they see the outputs stored so far and `run.status` failed; one that was
/// running when skiff stopped runs again, so `finally` steps should be idempotent), and the run
/// is stored as failed with the reason. Its leftover processes must have been ended first.
pub async fn finish_interrupted(
    store: Arc<dyn Store>,
    run: &Run,
    claim: Claim,
    pipeline: &Pipeline,
    opts: &RunOptions,
    observer: Arc<dyn RunObserver>,
    why: Interruption,
) -> Result<RunOutcome, RunnerError> {
    let stored = store.steps(&run.id).await?;
    drive(
        store,
        run,
        claim,
        pipeline,
        opts,
        observer,
        Some((stored, why)),
    )
    .await
}

/// What interrupted a run that another worker (or skiff's next start) finishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// skiff stopped (a crash, a kill -9) while it ran, and this is its next start.
    SkiffStopped,
    /// Its worker (named) stopped renewing its claim: killed, cut off, its machine gone.
    WorkerLost(String),
}

impl Interruption {
    /// The run's reason.
    fn reason(&self) -> String {
        match self {
            Interruption::SkiffStopped => INTERRUPTED.to_string(),
            Interruption::WorkerLost(w) => {
                format!("worker lost: {w} stopped renewing its claim while this run was running")
            }
        }
    }

    /// A main step's reason, when it was running.
    fn step_reason(&self) -> &'static str {
        match self {
            Interruption::SkiffStopped => "interrupted: skiff stopped while this step was running",
            Interruption::WorkerLost(_) => {
                "interrupted: its worker was lost while this step was running"
            }
        }
    }

    /// The log's note.
    fn note(&self) -> String {
        match self {
            Interruption::SkiffStopped => "skiff stopped while this run was running; its unfinished steps are ended and its finally steps run now".into(),
            Interruption::WorkerLost(w) => format!(
                "worker {w} was lost while this run was running (its claim ran out); its unfinished steps are ended and its finally steps run now, on another worker"
            ),
        }
    }

    /// Added to the reason when finally steps ran.
    fn finally_ran(&self) -> &'static str {
        match self {
            Interruption::SkiffStopped => "its finally steps ran after the restart",
            Interruption::WorkerLost(_) => "its finally steps ran on another worker",
        }
    }
}

async fn drive(
    store: Arc<dyn Store>,
    run: &Run,
    claim: Claim,
    pipeline: &Pipeline,
    opts: &RunOptions,
    observer: Arc<dyn RunObserver>,
    interrupted: Option<(Vec<StepRecord>, Interruption)>,
) -> Result<RunOutcome, RunnerError> {
    if !opts.workspace_root.is_absolute() {
        // Steps run in their workspace, so a relative path would name another place for them.
        return Err(RunnerError::Workspace {
            path: opts.workspace_root.display().to_string(),
            source: std::io::Error::other("the workspace root must be an absolute path"),
        });
    }
    // The steps as planned when the run was created (the same plan, from the same snapshot).
    let records: Vec<StepRecord> = pipeline.plan().iter().map(StepRecord::planned).collect();
    let user = match &opts.isolation {
        Isolation::Uids(pool) => Some(pool.take().map_err(|source| RunnerError::Workspace {
            path: opts.workspace_root.display().to_string(),
            source,
        })?),
        Isolation::Namespaces { .. } | Isolation::Off(_) => None,
    };
    let dirs = RunDirs::new(&opts.workspace_root, run.id.as_str());
    dirs.create(&opts.workspace_root, user.as_ref(), &opts.spares)
        .map_err(|source| RunnerError::Workspace {
            path: dirs.workspace.display().to_string(),
            source,
        })?;

    let rec = Recorder::new(store, claim, opts.store_patience);
    let renewing = rec.keep_claim(opts.lease);
    let masker = Masker::new(opts.secrets.values());
    let (log, writer) = start_writer(rec.clone(), observer.clone(), masker.clone());
    let stop = opts.cancel.child_token();
    let abort = opts.abort.child_token();
    // Trouble with the Store stops the main steps; a lost claim stops everything.
    let watcher = {
        let (rec, stop, abort) = (rec.clone(), stop.clone(), abort.clone());
        tokio::spawn(async move {
            rec.trouble.cancelled().await;
            stop.cancel();
            if rec.health() == Health::Lost {
                abort.cancel();
            }
        })
    };
    let deadline = Instant::now() + pipeline.run_timeout();
    let deadline_hit = Arc::new(AtomicBool::new(false));
    let timer = {
        let (stop, hit) = (stop.clone(), deadline_hit.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            hit.store(true, Ordering::SeqCst);
            stop.cancel();
        })
    };
    let mut runner = Runner {
        rec: rec.clone(),
        abort: abort.clone(),
        run,
        pipeline,
        opts,
        log,
        masker,
        base_env: Vec::new(),
        dirs,
        user,
        extra_group: None,
        steps: HashMap::new(),
        records,
        failed: false,
        first_failure: None,
        interrupt: None,
        stop,
        deadline_hit,
        deadline,
        tracker: process::RunTracker::new(run.id.as_str()),
    };
    let outcome = match interrupted {
        None => runner.execute().await,
        Some((stored, why)) => runner.resume(stored, why).await,
    };
    timer.abort();
    let Runner {
        log,
        dirs,
        user,
        tracker,
        masker,
        ..
    } = runner;
    // The run's processes end with its cgroup; only then are its folders done with, and its
    // uid free for another run.
    drop(tracker);
    let owner = RunUser::owner(user.as_ref());
    dirs.finish(
        &opts.workspace_root,
        owner,
        opts.keep_workspace,
        &opts.spares,
    );
    drop(user);
    drop(log);
    let _ = writer.await;
    watcher.abort();
    let mut outcome = outcome?;
    if outcome.status == RunStatus::Cancelled && !abort.is_cancelled() {
        // A cancel requested through the Store carries its own reason (who cancelled); keep it.
        if let Some(run) = rec.current().await
            && run.cancel_requested
            && let Some(reason) = run.cancel_reason
        {
            outcome.reason = Some(reason);
        }
    }
    if !masker.is_empty() {
        outcome.reason = outcome.reason.map(|r| masker.mask_str(&r));
    }
    let end = {
        let (status, reason) = (outcome.status, outcome.reason.clone());
        let (give_up, id) = (opts.abort.clone(), run.id.clone());
        async move {
            if !rec.finish(status, reason.as_deref(), &give_up).await {
                tracing::error!(run_id = %id, %status, "the run's end could not be stored (its claim was lost, or the store stayed away); whoever holds the run now finishes it");
            }
            renewing.abort();
        }
    };
    match &opts.end_behind {
        Some(tracker) => drop(tracker.spawn(end)),
        None => end.await,
    }
    Ok(outcome)
}

/// Why an interrupted run failed.
const INTERRUPTED: &str = "interrupted: skiff stopped while this run was running";

impl Runner<'_> {
    async fn execute(&mut self) -> Result<RunOutcome, RunnerError> {
        self.prepare_env().await;
        self.check_permissions().await;
        let main: Vec<Step> = self.pipeline.steps.clone();
        for (i, step) in main.iter().enumerate() {
            if self.interrupt.is_none()
                && (self.stop.is_cancelled() || self.rec.trouble.is_cancelled())
            {
                // Cancelled (or out of time) between two steps: the next one does not start.
                self.interrupt = Some(self.stop_cause());
            }
            if let Some(why) = self.interrupt {
                let reason = match why {
                    Interrupt::Cancelled => "run cancelled",
                    Interrupt::TimedOut => "run timed out",
                    Interrupt::StoreTrouble => "not run: the store is unavailable",
                };
                self.finish_unrun(i, StepStatus::Skipped, reason).await?;
                continue;
            }
            self.run_step(i, step).await?;
        }
        let cancelled_before = self.opts.cancel.is_cancelled();
        self.run_finally(|_| true).await?;
        if self.interrupt.is_none() && self.opts.cancel.is_cancelled() {
            // The cancel came after the main steps had ended: the run ends as it would have.
            let when = if cancelled_before {
                "as the main steps ended"
            } else {
                "while the finally steps ran"
            };
            self.log
                .note(
                    None,
                    &format!("a cancel was requested {when}; nothing was stopped, and the run keeps its outcome"),
                )
                .await;
        }
        Ok(self.outcome())
    }

    /// Why the main steps are being stopped: the Store, the run's deadline, or a cancel.
    fn stop_cause(&self) -> Interrupt {
        if self.rec.health() != Health::Up {
            Interrupt::StoreTrouble
        } else if self.deadline_hit.load(Ordering::SeqCst) {
            Interrupt::TimedOut
        } else {
            Interrupt::Cancelled
        }
    }

    /// The second half of an interrupted run: see [`finish_interrupted`].
    async fn resume(
        &mut self,
        stored: Vec<StepRecord>,
        why: Interruption,
    ) -> Result<RunOutcome, RunnerError> {
        self.prepare_env().await;
        self.log.note(None, &why.note()).await;
        self.failed = true;
        self.first_failure = Some(why.reason());
        for record in stored {
            if let Some(slot) = self.records.get_mut(record.index as usize)
                && slot.id == record.id
            {
                *slot = record;
            }
        }
        let now = Utc::now();
        let mut rerun = Vec::new();
        for index in 0..self.records.len() {
            let record = &mut self.records[index];
            let (status, reason) = match (record.phase, record.status) {
                (_, s) if s.is_terminal() => {
                    self.steps.insert(
                        record.id.clone(),
                        StepState {
                            status: s,
                            outputs: record.outputs.clone(),
                        },
                    );
                    continue;
                }
                (Phase::Finally, StepStatus::Running) => {
                    rerun.push(record.name.clone());
                    continue;
                }
                (Phase::Finally, _) => continue,
                (Phase::Main, StepStatus::Running) => (StepStatus::Failed, why.step_reason()),
                (Phase::Main, _) => (StepStatus::Skipped, "not run: the run was interrupted"),
            };
            record.status = status;
            record.reason = Some(reason.to_string());
            if status == StepStatus::Failed {
                record.finished_at = Some(now);
            }
            let id = record.id.clone();
            self.steps.insert(
                id,
                StepState {
                    status,
                    outputs: BTreeMap::new(),
                },
            );
            self.save(index).await?;
        }
        for name in rerun {
            self.log
                .note(
                    None,
                    &format!("finally step `{name}` was running when skiff stopped; it runs again"),
                )
                .await;
        }
        let ended: Vec<bool> = self
            .records
            .iter()
            .map(|r| r.status.is_terminal())
            .collect();
        let ran = self.run_finally(|i| !ended[i]).await?;
        let mut outcome = self.outcome();
        if outcome.status == RunStatus::Failed {
            outcome.reason = Some(if ran == 0 {
                why.reason()
            } else {
                format!("{}; {}", why.reason(), why.finally_ran())
            });
        }
        Ok(outcome)
    }

    /// Runs the `finally` steps whose index `wanted` accepts; returns how many were started.
    async fn run_finally(&mut self, wanted: impl Fn(usize) -> bool) -> Result<usize, RunnerError> {
        let finally: Vec<Step> = self.pipeline.finally.clone();
        let offset = self.pipeline.steps.len();
        let mut ran = 0;
        for (i, step) in finally.iter().enumerate() {
            if !wanted(offset + i) {
                continue;
            }
            if self.abort.is_cancelled() {
                self.finish_unrun(
                    offset + i,
                    StepStatus::Skipped,
                    "not run: the run was aborted",
                )
                .await?;
                continue;
            }
            self.run_step(offset + i, step).await?;
            if self.records[offset + i].started_at.is_some() {
                ran += 1;
            }
        }
        Ok(ran)
    }

    /// The run's end state, once its steps are done.
    fn outcome(&self) -> RunOutcome {
        let trouble = match self.rec.health() {
            Health::Up => None,
            Health::Away(e) => Some(format!("store unavailable: {e}")),
            Health::Lost => {
                Some("the run's claim was lost (another worker took the run over)".to_string())
            }
        };
        let (status, reason) = if let Some(why) = trouble {
            (RunStatus::Failed, Some(why))
        } else if self.abort.is_cancelled() {
            (RunStatus::Cancelled, Some(self.opts.abort_reason.clone()))
        } else {
            match self.interrupt {
                Some(Interrupt::Cancelled) => {
                    (RunStatus::Cancelled, Some(self.opts.cancel_reason.clone()))
                }
                Some(Interrupt::TimedOut) => (
                    RunStatus::TimedOut,
                    Some(format!(
                        "the run timed out after {}",
                        human(self.pipeline.run_timeout())
                    )),
                ),
                Some(Interrupt::StoreTrouble) => {
                    (RunStatus::Failed, Some("store unavailable".to_string()))
                }
                None if self.failed => (RunStatus::Failed, self.first_failure.clone()),
                None => (RunStatus::Succeeded, None),
            }
        };
        RunOutcome { status, reason }
    }

    /// A pipeline that asks for a power this worker does not give fails before its first step;
    /// one that is given gets it (the Docker socket's group for the run's user).
    async fn check_permissions(&mut self) {
        if !self.pipeline.permissions.contains(&Permission::Docker) {
            return;
        }
        if !self.opts.allow_docker_steps {
            let reason = "the pipeline asks for `permissions: [docker]` (root on the host), which \
                          this worker does not allow (start it with --allow-docker-steps)"
                .to_string();
            self.log.note(None, &reason).await;
            self.failed = true;
            self.first_failure.get_or_insert(reason);
            return;
        }
        if self.user.is_some() {
            match crate::isolation::docker_socket_group() {
                Ok(gid) => self.extra_group = Some(gid),
                Err(e) => {
                    let reason = format!("the Docker socket cannot be given to the steps: {e}");
                    self.log.note(None, &reason).await;
                    self.failed = true;
                    self.first_failure.get_or_insert(reason);
                }
            }
        }
    }

    /// The environment every step starts from: the runner's own, then the pipeline's `env:`.
    async fn prepare_env(&mut self) {
        self.base_env = self.base_env();
        let pipeline_env = self.pipeline.env.clone();
        let env = match self.eval_env(&pipeline_env, self.base_env.clone(), "running") {
            Ok(env) => env,
            Err(e) => {
                let reason = format!("pipeline env: {e}");
                self.log.note(None, &reason).await;
                self.failed = true;
                self.first_failure = Some(reason);
                self.base_env.clone()
            }
        };
        self.base_env = env;
    }

    /// The status `run.status` shows: `running` during main steps, the would-be final status
    /// during `finally`.
    fn visible_status(&self, phase: Phase) -> &'static str {
        match (phase, self.interrupt) {
            (Phase::Main, _) => "running",
            (_, Some(Interrupt::Cancelled)) => "cancelled",
            (_, Some(Interrupt::TimedOut)) => "timed_out",
            _ if self.failed => "failed",
            _ => "succeeded",
        }
    }

    fn scope<'s>(&'s self, env: &'s [(String, String)], status: &'s str) -> RunScope<'s> {
        RunScope {
            run: self.run,
            pipeline: self.pipeline,
            env,
            secrets: &self.opts.secrets,
            steps: &self.steps,
            failed: self.failed,
            cancelled: self.interrupt.is_some() || self.abort.is_cancelled(),
            run_status: status,
        }
    }

    /// Evaluates `vars` in order on top of `env`; each sees the ones before it.
    fn eval_env(
        &self,
        vars: &[EnvVar],
        mut env: Vec<(String, String)>,
        status: &str,
    ) -> Result<Vec<(String, String)>, String> {
        for var in vars {
            let value = var
                .value
                .eval_string(&self.scope(&env, status))
                .map_err(|e| format!("env `{}`: {e}", var.name))?;
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name.clone(), value));
        }
        Ok(env)
    }

    fn base_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = INHERITED_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        // The run's own HOME and TMPDIR (never skiff's), and its user's name.
        let name = match &self.user {
            Some(u) => format!("skiff-{}", u.uid),
            None => std::env::var("USER").unwrap_or_else(|_| "skiff".into()),
        };
        env.extend([
            ("HOME".to_string(), self.dirs.home.display().to_string()),
            ("TMPDIR".to_string(), self.dirs.tmp.display().to_string()),
            ("USER".to_string(), name.clone()),
            ("LOGNAME".to_string(), name),
        ]);
        env.extend([
            ("CI".to_string(), "true".to_string()),
            ("SKIFF".into(), "true".into()),
            ("SKIFF_RUN_ID".into(), self.run.id.to_string()),
            ("SKIFF_RUN_NUMBER".into(), self.run.number.to_string()),
            ("SKIFF_PIPELINE".into(), self.run.pipeline.clone()),
            ("SKIFF_TRIGGER".into(), self.run.trigger.kind.to_string()),
            (
                "SKIFF_WORKSPACE".into(),
                self.dirs.workspace.display().to_string(),
            ),
        ]);
        for (name, value) in &self.run.params {
            env.push((format!("SKIFF_PARAM_{}", env_key(name)), value.clone()));
        }
        // A declared param the run was not given (optional, no default) is there, empty, so a
        // script under `set -u` can test it.
        for p in &self.pipeline.params {
            if !self.run.params.contains_key(&p.name) {
                env.push((format!("SKIFF_PARAM_{}", env_key(&p.name)), String::new()));
            }
        }
        env
    }

    async fn save(&mut self, index: usize) -> Result<(), RunnerError> {
        // A reason may quote a value that held a secret (a working directory, an action's URL).
        if !self.masker.is_empty()
            && let Some(reason) = &self.records[index].reason
        {
            self.records[index].reason = Some(self.masker.mask_str(reason));
        }
        let record = &self.records[index];
        if index + 1 == self.records.len() && record.status.is_terminal() {
            // The run's last step: the run ends next, and its end is written with it.
            self.rec.step_at_end(record);
        } else {
            self.rec.step(record).await;
        }
        self.log.step_changed(record).await;
        Ok(())
    }

    async fn finish_unrun(
        &mut self,
        index: usize,
        status: StepStatus,
        reason: &str,
    ) -> Result<(), RunnerError> {
        let record = &mut self.records[index];
        record.status = status;
        record.reason = Some(reason.to_string());
        let id = record.id.clone();
        self.steps.insert(
            id,
            StepState {
                status,
                outputs: BTreeMap::new(),
            },
        );
        self.save(index).await
    }

    /// Decides whether the step runs, runs it with its retries, and records the result.
    async fn run_step(&mut self, index: usize, step: &Step) -> Result<(), RunnerError> {
        let status_text = self.visible_status(step.phase);
        // A main step without a status function in its `if:` means `success() && (if)`: after a
        // failure it is skipped for that reason, without looking at its condition.
        let implicit = step.phase == Phase::Main
            && step
                .condition
                .as_ref()
                .is_none_or(|c| !expr::uses_status_function(&c.expr));
        if implicit && self.failed {
            let reason = match &self.first_failure {
                Some(why) => format!("not run: {why}"),
                None => "not run: an earlier step failed".to_string(),
            };
            return self.finish_unrun(index, StepStatus::Skipped, &reason).await;
        }
        if let Some(cond) = &step.condition {
            let env = self.base_env.clone();
            let scope = self.scope(&env, status_text);
            match expr::eval(&cond.expr, &scope) {
                Ok(v) if v.truthy() => {}
                Ok(_) => {
                    let reason = format!("`if: {}` was false", cond.text);
                    return self.finish_unrun(index, StepStatus::Skipped, &reason).await;
                }
                Err(e) => {
                    let reason = format!("`if: {}`: {e}", cond.text);
                    self.log.note(Some(index as u32), &reason).await;
                    return self
                        .record_failure(index, step, StepStatus::Failed, reason)
                        .await;
                }
            }
        }

        let env = match self.eval_env(&step.env, self.base_env.clone(), status_text) {
            Ok(mut env) => {
                for (id, st) in &self.steps {
                    for (k, v) in &st.outputs {
                        env.push((
                            format!("SKIFF_STEP_{}_{}", env_key(id), env_key(k)),
                            v.clone(),
                        ));
                    }
                }
                env.push(("SKIFF_STEP_ID".into(), step.id.clone()));
                env.push(("SKIFF_RUN_STATUS".into(), status_text.to_string()));
                env
            }
            Err(reason) => {
                self.log.note(Some(index as u32), &reason).await;
                return self
                    .record_failure(index, step, StepStatus::Failed, reason)
                    .await;
            }
        };

        let mut backoff = step.retry.backoff;
        let attempts = step.retry.count + 1;
        let mut result;
        let started = Utc::now();
        let mut attempt = 1;
        loop {
            let record = &mut self.records[index];
            record.status = StepStatus::Running;
            record.attempt = attempt;
            record.started_at = Some(started);
            record.exit_code = None;
            record.reason = None;
            // Write "running" while the step's process starts, not before: the write is off the
            // path from trigger to first process. When the attempt ends before the Store took
            // the write (it waits behind other runs' writes), the attempt's end supersedes it and
            // it is dropped: under load a short step costs one write, not two. Either way it is
            // done with before anything else is written about the step, so the stored states
            // keep their order.
            let superseded = CancellationToken::new();
            let saving = {
                let (rec, record) = (self.rec.clone(), record.clone());
                let superseded = superseded.clone();
                tokio::spawn(async move { rec.step_unless_superseded(&record, &superseded).await })
            };
            self.log.step_changed(&self.records[index]).await;
            if attempt > 1 {
                self.log
                    .note(
                        Some(index as u32),
                        &format!("attempt {attempt} of {attempts}"),
                    )
                    .await;
            }
            let attempted = self.attempt(index, step, &env, status_text).await;
            superseded.cancel();
            saving
                .await
                .map_err(|e| RunnerError::Store(StoreError::Backend(e.to_string())))?;
            result = attempted?;
            let retryable = matches!(result.status, StepStatus::Failed | StepStatus::TimedOut)
                && !result.stopped
                && result.retryable;
            if !retryable || attempt >= attempts {
                break;
            }
            self.log
                .note(
                    Some(index as u32),
                    &format!(
                        "{}; retrying in {}",
                        result.reason.as_deref().unwrap_or("failed"),
                        human(backoff)
                    ),
                )
                .await;
            let stop = self.stop_token(step.phase);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => {
                    result = self.stopped_result(step.phase);
                    break;
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }

        let record = &mut self.records[index];
        record.status = result.status;
        record.exit_code = result.exit_code;
        record.finished_at = Some(Utc::now());
        record.reason = result.reason.clone();
        record.outputs = result.outputs.clone();
        self.steps.insert(
            step.id.clone(),
            StepState {
                status: result.status,
                outputs: result.outputs,
            },
        );
        self.save(index).await?;

        if result.stopped && step.phase == Phase::Main {
            self.interrupt = Some(self.stop_cause());
        } else if matches!(result.status, StepStatus::Failed | StepStatus::TimedOut)
            && !step.continue_on_error
        {
            self.failed = true;
            if self.first_failure.is_none() {
                self.first_failure = Some(format!(
                    "step `{}` {}",
                    step.name,
                    result.reason.as_deref().unwrap_or("failed")
                ));
            }
        }
        Ok(())
    }

    async fn record_failure(
        &mut self,
        index: usize,
        step: &Step,
        status: StepStatus,
        reason: String,
    ) -> Result<(), RunnerError> {
        let now = Utc::now();
        let record = &mut self.records[index];
        record.status = status;
        record.started_at = Some(now);
        record.finished_at = Some(now);
        record.reason = Some(reason.clone());
        self.steps.insert(
            step.id.clone(),
            StepState {
                status,
                outputs: BTreeMap::new(),
            },
        );
        self.save(index).await?;
        if !step.continue_on_error {
            self.failed = true;
            self.first_failure
                .get_or_insert(format!("step `{}`: {reason}", step.name));
        }
        Ok(())
    }

    fn stop_token(&self, phase: Phase) -> CancellationToken {
        match phase {
            Phase::Main => self.stop.clone(),
            Phase::Finally => self.abort.clone(),
        }
    }

    fn stopped_result(&self, phase: Phase) -> AttemptResult {
        let timed_out = phase == Phase::Main && self.deadline_hit.load(Ordering::SeqCst);
        AttemptResult {
            status: if timed_out {
                StepStatus::TimedOut
            } else {
                StepStatus::Cancelled
            },
            exit_code: None,
            reason: Some(if phase == Phase::Main && self.rec.health() != Health::Up {
                "stopped: the store is unavailable".into()
            } else if timed_out {
                "the run timed out".into()
            } else if phase == Phase::Finally {
                "stopped before it ended: the run was aborted".into()
            } else {
                "cancelled".into()
            }),
            outputs: BTreeMap::new(),
            stopped: true,
            retryable: false,
        }
    }

    /// One attempt of a step.
    /// Whether a step's deadline passing at `now` is the step's own timeout (not the run's).
    fn step_timeout_hit(&self, step: &Step, now: Instant) -> bool {
        step.phase == Phase::Finally || now < self.deadline
    }

    async fn attempt(
        &self,
        index: usize,
        step: &Step,
        env: &[(String, String)],
        status: &str,
    ) -> Result<AttemptResult, RunnerError> {
        let stop = self.stop_token(step.phase);
        let step_deadline = match (step.phase, step.timeout) {
            (Phase::Main, Some(t)) => Some((Instant::now() + t).min(self.deadline)),
            (Phase::Main, None) => Some(self.deadline),
            (Phase::Finally, t) => Some(Instant::now() + t.unwrap_or(FINALLY_DEFAULT_TIMEOUT)),
        };
        let scope = self.scope(env, status);
        let cwd = match &step.working_directory {
            None => self.dirs.workspace.clone(),
            Some(dir) => self.dirs.workspace.join(dir),
        };
        if !cwd.is_dir() {
            return Ok(AttemptResult::failed(format!(
                "working directory {} does not exist",
                cwd.display()
            )));
        }
        match &step.action {
            StepAction::Run { script } => {
                self.attempt_script(index, step, script, env, &cwd, &stop, step_deadline)
                    .await
            }
            StepAction::Uses { action, with } => {
                self.attempt_action(index, step, *action, with, &scope, &stop, step_deadline)
                    .await
            }
        }
    }
}

struct AttemptResult {
    status: StepStatus,
    exit_code: Option<i32>,
    reason: Option<String>,
    outputs: BTreeMap<String, String>,
    /// Ended by a cancel or the run's deadline (not retried).
    stopped: bool,
    /// Whether the step's `retry:` may try again (not after an action's bad inputs or refusal).
    retryable: bool,
}

impl AttemptResult {
    fn succeeded(outputs: BTreeMap<String, String>) -> Self {
        AttemptResult {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            reason: None,
            outputs,
            stopped: false,
            retryable: true,
        }
    }

    fn from_action_error(e: &actions::ActionError) -> Self {
        AttemptResult {
            retryable: e.retryable(),
            ..AttemptResult::failed(e.to_string())
        }
    }

    fn failed(reason: String) -> Self {
        AttemptResult {
            status: StepStatus::Failed,
            exit_code: None,
            reason: Some(reason),
            outputs: BTreeMap::new(),
            stopped: false,
            retryable: true,
        }
    }
}
