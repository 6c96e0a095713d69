//! The embedded queue: apalis with its SQLite backend, on the Store's own pool and file.
//!
//! apalis fetches by polling. An idle worker would look for work only at its heartbeat, so the
//! queue raises its own wake signal after each push commits (a `Notify` the worker's poll
//! strategy waits on), with a slow tick beside it as a safety net. A `Notify` keeps a wake that
//! arrives while the worker is busy fetching, so none is lost.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_sqlite::{Config, SqliteStorage};
use async_trait::async_trait;
use sqlx::SqlitePool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Queue, QueueError, RunJob};

/// The queue's name in the jobs table, set explicitly (apalis would use a Rust type name).
pub const QUEUE_NAME: &str = "skiff-runs";
/// The safety tick: an idle worker fetches at least this often even when never woken.
const SAFETY_TICK: Duration = Duration::from_millis(500);
/// Finished jobs older than this are removed from the jobs table.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// What a worker does with a job. `Err` is an infrastructure failure; it is logged and the job
/// is not retried (a failed run is recorded as such by the handler and is `Ok`).
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn handle(&self, job: RunJob) -> Result<(), String>;
}

#[derive(Clone)]
pub struct SqliteQueue {
    storage: SqliteStorage<RunJob>,
    wake: Arc<Notify>,
}

fn queue_error(e: impl std::fmt::Display) -> QueueError {
    QueueError(e.to_string())
}

impl SqliteQueue {
    /// Sets up apalis's tables on `pool` and opens the queue. `batch` is how many jobs a fetch
    /// may claim: the worker's concurrency, so one worker does not hoard jobs others could run.
    pub async fn open(pool: &SqlitePool, batch: usize) -> Result<Self, QueueError> {
        // Only the migrations: `SqliteStorage::setup` would also switch the connection it runs on
        // to `synchronous=OFF` and a 256 MB page cache, behind the Store's back.
        SqliteStorage::migrations()
            .run(pool)
            .await
            .map_err(queue_error)?;
        let config = Config::default().queue(QUEUE_NAME).batch_size(batch.max(1));
        let storage = SqliteStorage::new(pool).with_config(config);
        Ok(SqliteQueue {
            storage,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Starts one apalis worker with `concurrency` slots that hands jobs to `handler`, until
    /// `shutdown` fires. The returned task ends when the worker has stopped.
    pub fn spawn_workers(
        &self,
        concurrency: usize,
        handler: Arc<dyn JobHandler>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let wake = self.wake.clone();
        let strategy = Strategy::new()
            .apply(FutureStrategy::new(move |_snap: &PollSnapshot| {
                let wake = wake.clone();
                async move { wake.notified().await }
            }))
            .interval(SAFETY_TICK);
        let backend = self.storage.clone().poll_with_strategy(strategy);
        // A fresh name per start: apalis refuses a worker name seen within a heartbeat.
        let name = format!(
            "skiff-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let worker = WorkerBuilder::new(name)
            .backend(backend)
            .data(Handler(handler))
            .concurrency(concurrency.max(1))
            .build(handle);
        let mut vacuum = self.storage.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = apalis_core::backend::Vacuum::vacuum_before(&mut vacuum, KEEP_FINISHED).await {
                            tracing::warn!(error = %e, "removing finished jobs failed");
                        }
                    }
                    () = stop.cancelled() => return,
                }
            }
        });
        tokio::spawn(async move {
            let result = worker
                .run_until(async move {
                    shutdown.cancelled().await;
                    Ok::<(), WorkerError>(())
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the queue worker stopped");
            }
        })
    }
}

/// The handler as the worker's shared data (a named type: apalis's handler bounds do not accept
/// a trait object's lifetime directly).
#[derive(Clone)]
struct Handler(Arc<dyn JobHandler>);

async fn handle(job: RunJob, handler: Data<Handler>) -> Result<(), BoxDynError> {
    let run = job.run_id.clone();
    let Handler(inner) = &*handler;
    inner.handle(job).await.map_err(|e| {
        tracing::error!(run_id = %run, error = %e, "executing a run failed");
        AbortError::new(e).into()
    })
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn push(&self, job: RunJob) -> Result<(), QueueError> {
        let mut storage = self.storage.clone();
        storage.push(job).await.map_err(queue_error)?;
        // After the commit: the woken worker's fetch sees the job.
        self.wake.notify_one();
        Ok(())
    }
}
