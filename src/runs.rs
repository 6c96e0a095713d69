//! The runs a process's workers execute, shared by `skiff serve` (its in-process workers) and
//! `skiff worker`: the job handler, and taking over the runs whose worker is gone.

use std::collections::BTreeSet;
use std::sync::Arc;

use skiff_core::dispatch::RunJob;
use skiff_core::queue::JobHandler;
use skiff_core::run::{Run, RunStatus};
use skiff_core::store::{Store, StoreError, TakeOver, runs_in};
use skiff_worker::pool::{Stopping, WorkerConfig, finish_interrupted_run, handle_job};

/// The job handler of a process's workers.
pub struct Handler {
    pub store: Arc<dyn Store>,
    pub config: WorkerConfig,
    pub stopping: Stopping,
    /// The labels of this process's workers: a run taken over must need no other. `None`: the
    /// embedded queue's workers, which take every run.
    pub labels: Option<BTreeSet<String>>,
    /// Where a run taken over before any of its steps started goes back to (the distributed
    /// queue): it then runs once, elsewhere. `None`: such a run is finished as interrupted.
    pub requeue: Option<Arc<dyn skiff_core::dispatch::Queue>>,
}

#[async_trait::async_trait]
impl JobHandler for Handler {
    async fn handle(&self, job: RunJob) -> Result<(), String> {
        if self.stopping.cancel.is_cancelled() {
            // Not claimed: the run stays queued (embedded: queued again, in order, at the next
            // start; distributed: the job goes back on its list for another worker).
            return Err("skiff is stopping; the run is left for the next worker".into());
        }
        let _running = self.stopping.running.token();
        handle_job(self.store.clone(), job, &self.config, &self.stopping)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The labels a run needs (its pipeline snapshot's `runs_on`, and `secret:NAME` for the secrets
/// its steps use); a snapshot that no longer loads needs none (any worker records its failure).
pub fn labels_of(run: &Run) -> Vec<String> {
    skiff_core::pipeline::load(&run.source, &run.pipeline)
        .map(|p| skiff_core::dispatch::needs(&p))
        .unwrap_or_default()
}

/// Which runs [`finish_interrupted_runs`] takes over.
#[derive(Clone, Copy)]
pub enum Interrupted {
    /// At the start of a `skiff serve` that holds its data folder's lock: runs held by the
    /// in-process workers of an earlier server on it (whatever their lease; that server is
    /// gone), and other runs whose lease ran out.
    AtStart,
    /// Runs whose lease ran out: their worker stopped renewing it (killed, or cut off).
    Expired,
}

/// The start of the names of the in-process workers of an embedded `skiff serve`.
pub const SERVE_WORKER: &str = "serve:";

/// Finishes the runs whose worker is gone: their leftover processes here are ended, then each
/// is finished the way a run ends (its unfinished steps recorded truthfully and its `finally`
/// steps run, see `finish_interrupted`), beside the queue. Only runs whose labels this process
/// has are taken: the worker that takes one over can reach what its run made.
pub async fn finish_interrupted_runs(
    handler: &Arc<Handler>,
    which: Interrupted,
) -> anyhow::Result<()> {
    let store = &handler.store;
    for run in runs_in(store.as_ref(), RunStatus::Running).await? {
        let holder = run.claimed_by.clone().unwrap_or_default();
        if holder == handler.config.name {
            continue;
        }
        if let Some(labels) = &handler.labels {
            let offers = skiff_core::dispatch::offers(labels, handler.config.secrets.names());
            if !labels_of(&run).iter().all(|l| offers.contains(l)) {
                continue;
            }
        }
        let when = match which {
            Interrupted::AtStart if holder.is_empty() || holder.starts_with(SERVE_WORKER) => {
                TakeOver::Any
            }
            _ => TakeOver::Expired,
        };
        let claim = match store
            .take_over_run(&run.id, &handler.config.name, handler.config.lease, when)
            .await
        {
            Ok((_, claim)) => claim,
            // Its worker is alive (or the run ended, or another worker took it first).
            Err(StoreError::Held { .. } | StoreError::InvalidTransition { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(queue) = &handler.requeue
            && when == TakeOver::Expired
            && requeue_unstarted(store.as_ref(), queue.as_ref(), &run, &claim).await
        {
            continue;
        }
        let why = if when == TakeOver::Any {
            skiff_worker::Interruption::SkiffStopped
        } else {
            skiff_worker::Interruption::WorkerLost(holder.clone())
        };
        let reaped = skiff_worker::clean_up_interrupted(&handler.config.workspace_root, &run.id);
        eprintln!(
            "skiff: run {} #{} was interrupted ({}){}; running its finally steps",
            run.pipeline,
            run.number,
            match which {
                Interrupted::AtStart if when == TakeOver::Any => "skiff stopped while it ran",
                _ => "its worker stopped renewing its claim",
            },
            if reaped {
                " and its leftover processes were ended"
            } else {
                ""
            }
        );
        let handler = handler.clone();
        let token = handler.stopping.running.token();
        tokio::spawn(async move {
            let _running = token;
            if let Err(e) = finish_interrupted_run(
                handler.store.clone(),
                &run,
                claim,
                &handler.config,
                &handler.stopping,
                why,
            )
            .await
            {
                tracing::error!(run_id = %run.id, error = %e, "finishing an interrupted run failed");
            }
        });
    }
    Ok(())
}

/// Gives a taken-over run back to the queue if none of its steps started (its worker died
/// between claiming it and starting it); whether it did.
async fn requeue_unstarted(
    store: &dyn Store,
    queue: &dyn skiff_core::dispatch::Queue,
    run: &Run,
    claim: &skiff_core::store::Claim,
) -> bool {
    match store.release_run(claim).await {
        Ok(_) => {}
        Err(StoreError::InvalidTransition { .. }) => return false,
        Err(e) => {
            tracing::warn!(run_id = %run.id, error = %e, "giving an unstarted run back failed");
            return false;
        }
    }
    let job = skiff_core::dispatch::RunJob::with_labels(&run.id, labels_of(run));
    if let Err(e) = queue.push(job).await {
        // The sweeper gives it a job once it has waited long enough.
        tracing::warn!(run_id = %run.id, error = %e, "queueing a released run failed");
    }
    eprintln!(
        "skiff: run {} #{} was claimed by {} but never started; it is queued again",
        run.pipeline,
        run.number,
        run.claimed_by.as_deref().unwrap_or("a lost worker")
    );
    true
}

/// Looks for runs whose worker stopped renewing its claim, every third of a lease, until the
/// process stops.
pub async fn recover_abandoned_runs(handler: Arc<Handler>) {
    let mut tick = tokio::time::interval(handler.config.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = handler.stopping.cancel.cancelled() => return,
        }
        if let Err(e) = finish_interrupted_runs(&handler, Interrupted::Expired).await {
            tracing::warn!(error = %e, "looking for abandoned runs failed");
        }
    }
}

/// Ends the processes of every run this process's workers still hold (when stopping could not
/// wait any longer); returns how many runs that was.
pub async fn end_leftover_processes(handler: &Handler) -> usize {
    let runs = runs_in(handler.store.as_ref(), RunStatus::Running)
        .await
        .unwrap_or_default();
    let mine: Vec<_> = runs
        .iter()
        .filter(|r| r.claimed_by.as_deref() == Some(handler.config.name.as_str()))
        .collect();
    for run in &mine {
        skiff_worker::clean_up_interrupted(&handler.config.workspace_root, &run.id);
    }
    mine.len()
}

pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
