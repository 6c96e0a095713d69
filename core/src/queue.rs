//! The embedded queue: apalis with its SQLite backend, on the Store's own pool and file.
//!
//! apalis fetches by polling. An idle worker would look for work only at its heartbeat, so the
//! queue raises its own wake signal after each push commits, and the worker's poll strategy
//! (`WakeStrategy`) turns it into a fetch at once. Two traps are avoided. A fetch that started
//! before the push committed comes back empty; a one-shot signal consumed by it would be lost, so
//! the signal is a push counter: the strategy fetches again whenever the count moved since it
//! last looked. And a timer that fired must be re-armed and polled again or it never wakes
//! anyone, so the safety tick is re-armed on every firing.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::*;
use apalis_sqlite::{Config, SqliteStorage};
use async_trait::async_trait;
use futures_util::task::AtomicWaker;
use sqlx::SqlitePool;
use tokio::time::{Instant, Sleep};
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
    wake: Arc<Wake>,
}

/// "Jobs were pushed": a counter that every push bumps, and the worker's waker.
#[derive(Default)]
struct Wake {
    pushes: AtomicU64,
    waker: AtomicWaker,
}

impl Wake {
    fn raise(&self) {
        self.pushes.fetch_add(1, Ordering::Release);
        self.waker.wake();
    }
}

/// The worker's poll strategy: ready when pushes happened since it last looked, and when the
/// safety tick fires.
struct WakeStrategy {
    wake: Arc<Wake>,
    /// The push count last seen (`u64::MAX` before the first poll, which fetches at once).
    seen: u64,
    tick: Pin<Box<Sleep>>,
}

impl WakeStrategy {
    fn new(wake: Arc<Wake>) -> Self {
        WakeStrategy {
            wake,
            seen: u64::MAX,
            tick: Box::pin(tokio::time::sleep(SAFETY_TICK)),
        }
    }
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _snapshot: &PollSnapshot) -> Poll<Option<()>> {
        use std::future::Future;
        let mut ready = false;
        // Register before reading the count: a push after the read wakes this waker.
        self.wake.waker.register(cx.waker());
        let pushes = self.wake.pushes.load(Ordering::Acquire);
        if pushes != self.seen {
            ready = true;
            self.seen = pushes;
        }
        while self.tick.as_mut().poll(cx).is_ready() {
            ready = true;
            self.tick.as_mut().reset(Instant::now() + SAFETY_TICK);
        }
        if ready {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
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
        // `lock_tasks(false)`: a fetch already marks its jobs as taken by this worker; the extra
        // write per job that marks them running is not needed (the run's own state is the Store's).
        let config = Config::default()
            .queue(QUEUE_NAME)
            .batch_size(batch.max(1))
            .lock_tasks(false);
        let storage = SqliteStorage::new(pool).with_config(config);
        Ok(SqliteQueue {
            storage,
            wake: Arc::new(Wake::default()),
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
        let backend = self
            .storage
            .clone()
            .poll_with_strategy(WakeStrategy::new(self.wake.clone()));
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
                        // apalis 1.0 removes every finished job here, whatever its age; the runs
                        // themselves live in the Store.
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
        self.wake.raise();
        Ok(())
    }
}
