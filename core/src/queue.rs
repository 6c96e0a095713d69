//! The embedded queue: apalis's worker and apalis-sqlite's jobs table and queries, on the
//! Store's own writer connection and file.
//!
//! apalis-sqlite's `SqliteStorage` wraps every push, fetch and ack in a transaction of its own
//! (BEGIN, the statement, COMMIT: three round trips to the connection's thread), and its worker
//! fetches whenever it is polled with a free slot, so a running job's every wake-up costs an
//! empty fetch on the one writer connection the runs also write through. skiff keeps apalis's
//! worker, tables and queries and plugs in at apalis's own extension points instead:
//!
//! - [`JobsTable`], a `Persistence` whose push, fetch and ack are one statement each (each is
//!   atomic on its own), and
//! - [`JobSource`], the worker's backend: apalis-core's `Persisted` driving `JobsTable`, gated so
//!   that a fetch happens only when it can find something: jobs were pushed since the last fetch
//!   started, the last fetch filled its batch, or the safety tick fired.
//!
//! The push signal is a counter, not a flag: a fetch that started before a push committed comes
//! back empty, and a one-shot signal consumed by it would be lost. The fetch notes the count it
//! started at; any push after that moves the count and wakes the worker.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::*;
use apalis_core::backend::finalize::Durable;
use apalis_core::backend::persistence::{
    Persisted, Persistence, State, TaskEvent, TaskPersistLayer,
};
use apalis_core::backend::{BackendConfig, WireFormatBackend, WorkerFilter};
use apalis_sqlite::queries::{self, AckPayload};
use apalis_sqlite::{Config, Error as SqliteError, JsonCodec, SqliteStorage};
use async_trait::async_trait;
use futures_util::task::AtomicWaker;
use serde_json::Value;
use sqlx::Connection;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Queue, QueueError, RunJob};
use crate::store::Writer;

/// The queue's name in the jobs table, set explicitly (apalis would use a Rust type name).
pub const QUEUE_NAME: &str = "skiff-runs";
/// The safety tick: an idle worker fetches at least this often even when never woken.
const SAFETY_TICK: Duration = Duration::from_millis(500);
/// Finished jobs older than this are removed from the jobs table...
const KEEP_FINISHED: Duration = Duration::from_secs(3600);
/// ...this often.
const CLEAN_EVERY: Duration = Duration::from_secs(600);

/// What a worker does with a job. `Err` is an infrastructure failure; it is logged and the job
/// is not retried (a failed run is recorded as such by the handler and is `Ok`).
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn handle(&self, job: RunJob) -> Result<(), String>;
}

#[derive(Clone)]
pub struct SqliteQueue {
    table: JobsTable,
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

/// apalis-sqlite's jobs table through its public queries, one statement per push, fetch and ack.
/// Registering a worker, its heartbeat and taking back abandoned jobs keep their transactions
/// (each does two things that belong together, and they are rare).
#[derive(Clone)]
pub struct JobsTable {
    writer: Writer,
    config: Config,
    acks: Arc<PendingAcks>,
}

/// Acks are written after a short delay, several in one statement: off the path from one run's
/// end to the worker's next run (its fetch and claim), where each would cost a round trip on the
/// one writer connection.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// Acks waiting to be written, and whether a write of them is scheduled.
#[derive(Default)]
struct PendingAcks {
    acks: std::sync::Mutex<Vec<Value>>,
    scheduled: std::sync::atomic::AtomicBool,
}

impl PendingAcks {
    fn take(&self) -> Vec<Value> {
        let mut acks = match self.acks.lock() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::take(&mut *acks)
    }

    fn add(&self, ack: Value) {
        match self.acks.lock() {
            Ok(mut a) => a.push(ack),
            Err(poisoned) => poisoned.into_inner().push(ack),
        }
    }
}

/// One ack as [`write_acks`] reads it: what apalis-sqlite's `ack_tasks` writes, for one job
/// found by its primary key. Its own query joins the acks (a JSON array) to every job the worker
/// ever took and parses the JSON again for each of them, so an ack costs more with every job
/// until the table is vacuumed.
fn ack_entry(worker: &str, ack: &AckPayload) -> Result<Value, SqliteError> {
    let result = serde_json::to_string(&ack.result).map_err(SqliteError::JsonError)?;
    Ok(serde_json::json!({
        "id": ack.task_id.to_string(),
        "worker": worker,
        "status": ack.status.to_string(),
        "attempts": i64::try_from(ack.attempt).unwrap_or(i64::MAX),
        "result": result,
    }))
}

/// Writes acks (from [`ack_entry`]) in one statement.
async fn write_acks(writer: &Writer, acks: &[Value]) -> Result<(), SqliteError> {
    if acks.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE Jobs SET status = a.value ->> 'status', attempts = a.value ->> 'attempts',
            last_result = a.value ->> 'result', done_at = strftime('%s', 'now')
         FROM json_each(?1) AS a
         WHERE Jobs.id = a.value ->> 'id' AND Jobs.lock_by = a.value ->> 'worker'",
    )
    .bind(Value::Array(acks.to_vec()).to_string())
    .execute(&mut *writer.lock().await)
    .await?;
    Ok(())
}

impl JobsTable {
    /// Writes every ack not yet written.
    async fn flush_acks(&self) -> Result<(), SqliteError> {
        let acks = self.acks.take();
        write_acks(&self.writer, &acks).await
    }

    /// Writes the pending acks [`ACK_DELAY`] from now, unless that is scheduled already.
    fn schedule_acks(&self) {
        if self.acks.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let table = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ACK_DELAY).await;
            // Cleared before taking: an ack added after this schedules a write of its own.
            table.acks.scheduled.store(false, Ordering::Release);
            if let Err(e) = table.flush_acks().await {
                // Only the jobs table's record is missing: the run's state is the Store's, and a
                // job delivered again finds its run no longer queued.
                tracing::warn!(error = %e, "acknowledging finished jobs failed");
            }
        });
    }
}

impl Persistence for JobsTable {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = SqliteError;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), SqliteError> {
        let dead_for = i64::try_from(self.config.heartbeat_interval.as_secs()).unwrap_or(i64::MAX);
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let only = WorkerFilter::Only(worker.name().to_owned());
        queries::reenqueue_orphaned(&mut *tx, dead_for, self.config.queue.as_ref(), &only).await?;
        queries::register_worker(&mut *tx, &self.config, worker, "skiff").await?;
        tx.commit().await?;
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), SqliteError> {
        let dead_for = i64::try_from(self.config.orphaned_duration().as_secs()).unwrap_or(i64::MAX);
        let others = WorkerFilter::AllExcept(worker.name().to_owned());
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        queries::keep_alive(&mut *tx, &self.config, worker).await?;
        queries::reenqueue_orphaned(&mut *tx, dead_for, self.config.queue.as_ref(), &others)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_next(
        &mut self,
        worker: &WorkerContext,
    ) -> Result<Vec<apalis_sqlite::SqliteTask>, SqliteError> {
        // One `UPDATE .. RETURNING`: it takes the jobs and returns them atomically.
        queries::fetch_next(&mut *self.writer.lock().await, &self.config, worker).await
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<apalis_sqlite::SqliteTask>,
        worker: &WorkerContext,
    ) -> Result<u64, SqliteError> {
        let ids: Vec<String> = tasks
            .iter()
            .filter_map(|t| t.task_id().as_ref().map(|id| id.to_string()))
            .collect();
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let count =
            queries::reenqueue_abandoned(&mut *tx, self.config.queue.as_ref(), worker.name(), &ids)
                .await?;
        if usize::try_from(count).ok() != Some(tasks.len()) {
            return Err(SqliteError::ReenqueueMismatch {
                queued: tasks.len(),
                abandoned: usize::try_from(count).unwrap_or(usize::MAX),
            });
        }
        tx.commit().await?;
        Ok(count)
    }

    async fn handle_events(
        &mut self,
        events: Vec<TaskEvent<Value>>,
        worker: &WorkerContext,
    ) -> Result<(), SqliteError> {
        // Jobs are not locked (`lock_tasks(false)`): the run's claim in the Store is the lock.
        for event in &events {
            if let TaskEvent::Complete(ack) = event {
                self.acks.add(ack_entry(worker.name(), ack)?);
            }
        }
        if worker.is_shutting_down() {
            self.flush_acks().await
        } else {
            self.schedule_acks();
            Ok(())
        }
    }

    async fn push_tasks(
        &mut self,
        tasks: Vec<apalis_sqlite::SqliteTask>,
    ) -> Result<(), SqliteError> {
        let queue = self.config.queue.as_ref();
        let mut conn = self.writer.lock().await;
        if let [_] = tasks.as_slice() {
            queries::push_tasks(&mut *conn, queue, &tasks).await
        } else {
            let mut tx = conn.begin().await?;
            queries::push_tasks(&mut *tx, queue, &tasks).await?;
            tx.commit().await?;
            Ok(())
        }
    }
}

/// The worker's backend: apalis-core's `Persisted` state machine over [`JobsTable`] (worker
/// registration, heartbeats, buffered batches, acks), with the fetch gated on the push counter.
pub struct JobSource {
    /// Derefs to the `JobsTable`, whose config is the worker's.
    persisted: Persisted<JobsTable>,
    codec: JsonCodec<Vec<u8>>,
    wake: Arc<Wake>,
    /// The push count when the last fetch started (`u64::MAX` before the first fetch).
    seen: u64,
    /// Jobs handed out since the last fetch started: a full batch means more may be waiting.
    handed_out: usize,
    tick: Pin<Box<Sleep>>,
}

impl JobSource {
    /// Whether a fetch could find anything. Registers the worker's waker first, so that a push
    /// made after the count is read wakes it.
    fn fetch_due(&mut self, cx: &mut Context<'_>) -> bool {
        use std::future::Future;
        self.wake.waker.register(cx.waker());
        let pushes = self.wake.pushes.load(Ordering::Acquire);
        let mut due = pushes != self.seen || self.handed_out >= self.persisted.config.batch_size;
        if self.tick.as_mut().poll(cx).is_ready() {
            due = true;
        }
        if due {
            self.seen = pushes;
            self.handed_out = 0;
            // The tick is the longest an idle worker goes without a fetch: restart it, and poll
            // it once so that it wakes this task when it fires.
            self.tick.as_mut().reset(Instant::now() + SAFETY_TICK);
            let _ = self.tick.as_mut().poll(cx);
        }
        due
    }
}

impl Backend for JobSource {
    type Task = apalis_sqlite::SqliteTask;
    type Error = SqliteError;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), SqliteError>> {
        let heartbeat = self.persisted.config.heartbeat_interval;
        self.persisted.poll_ready(cx, worker, heartbeat)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, SqliteError>>> {
        // In `Ready`, polling `Persisted` starts a fetch; elsewhere it drives one, or hands out
        // a fetched job.
        if matches!(self.persisted.state(), State::Ready) && !self.fetch_due(cx) {
            return Poll::Pending;
        }
        let next = self.persisted.poll_next(cx, worker);
        if let Poll::Ready(Some(Ok(_))) = &next {
            self.handed_out += 1;
        }
        next
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), SqliteError>> {
        self.persisted.poll_close(cx, worker)
    }
}

impl BackendConfig for JobSource {
    type Args = RunJob;
    type Id = ulid::Ulid;
    type Kind = Durable;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persisted.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let config = self.persisted.config.clone();
        self.persisted
            .layer(JsonCodec::default(), config.batch_size)
            .persist_results(config.persist_results)
            .lock_tasks(config.lock_tasks)
    }
}

impl WireFormatBackend for JobSource {
    type Codec = JsonCodec<Vec<u8>>;
    type Compact = Vec<u8>;

    fn codec(&self) -> &Self::Codec {
        &self.codec
    }
}

/// The embedded queue's side of a new run's transaction: the Store writes the run's job in the
/// same transaction as the run (one commit, and never one without the other), then calls
/// [`JobOutbox::pushed`]. Set on the Store's writer when the queue is opened on it.
pub struct JobOutbox {
    queue: String,
    wake: Arc<Wake>,
    /// Job ids in the order their runs were made: jobs are fetched by `run_at` (seconds), then
    /// id, and ids from one monotonic generator keep runs made within a second in order.
    ids: std::sync::Mutex<ulid::Generator>,
}

/// A job's row in apalis-sqlite's jobs table, as its `push_tasks` makes it from a task.
pub(crate) struct JobRow {
    args: Vec<u8>,
    id: String,
    queue: String,
    max_attempts: i64,
    run_at: i64,
    priority: i64,
    metadata: String,
}

impl JobOutbox {
    /// The row of `run`'s job, with apalis's defaults (a new ULID, now, 25 attempts).
    pub(crate) fn row(&self, run: &crate::run::RunId) -> Result<JobRow, String> {
        let args = serde_json::to_vec(&RunJob::new(run)).map_err(|e| e.to_string())?;
        let id = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generate()
            .map_err(|e| e.to_string())?;
        let task = apalis_core::task::builder::TaskBuilder::new(args)
            .task_id(apalis_core::task::task_id::TaskId::from(id))
            .build();
        let id = id.to_string();
        let run_at = task.run_at().unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        });
        Ok(JobRow {
            id,
            queue: self.queue.clone(),
            max_attempts: i64::try_from(task.max_attempts().unwrap_or(25)).unwrap_or(25),
            run_at: i64::try_from(run_at).unwrap_or(i64::MAX),
            priority: i64::try_from(task.priority().unwrap_or_default()).unwrap_or(0),
            metadata: serde_json::to_string(task.metadata()).map_err(|e| e.to_string())?,
            args: task.args,
        })
    }

    /// Wakes the worker's fetch, once the transaction with the job has committed.
    pub(crate) fn pushed(&self) {
        self.wake.raise();
    }
}

impl JobRow {
    /// Adds the row's values, in the order of the Store's job statement's parameters.
    pub(crate) fn add_to(
        &self,
        args: &mut sqlx::sqlite::SqliteArguments,
    ) -> Result<(), sqlx::error::BoxDynError> {
        use sqlx::Arguments;
        args.add(self.args.as_slice())?;
        args.add(self.id.as_str())?;
        args.add(self.queue.as_str())?;
        args.add(self.max_attempts)?;
        args.add(self.run_at)?;
        args.add(self.priority)?;
        args.add(self.metadata.as_str())
    }
}

fn queue_error(e: impl std::fmt::Display) -> QueueError {
    QueueError(e.to_string())
}

impl SqliteQueue {
    /// Removes the jobs that finished more than `older_than` ago (the runs themselves live in
    /// the Store); returns how many. The worker does this every 10 minutes for jobs older than an
    /// hour. Not apalis-sqlite's `vacuum_before`: it compares a job's integer time with a date
    /// string, which removes every finished job whatever its age, and then runs `VACUUM`, which
    /// rewrites the whole database (runs and all) while every writer waits.
    pub async fn remove_finished(&self, older_than: Duration) -> Result<u64, QueueError> {
        let keep = i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "DELETE FROM Jobs
             WHERE (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
               AND done_at < CAST(strftime('%s', 'now') AS INTEGER) - ?1",
        )
        .bind(keep)
        .execute(&mut *self.table.writer.lock().await)
        .await
        .map_err(queue_error)?;
        Ok(done.rows_affected())
    }

    /// Replaces every job not yet done with one job per run of `runs`, in that order (the order
    /// the runs were created in). For a start of the embedded deployment, before its worker
    /// runs: a job left by the last process (waiting, or taken but never started because skiff
    /// was stopping) would otherwise keep its place or lose it, and runs queued again at the end
    /// would start after runs that were created later.
    pub async fn requeue_in_order(
        &self,
        runs: &[(crate::run::RunId, chrono::DateTime<chrono::Utc>)],
    ) -> Result<(), QueueError> {
        let mut ids = ulid::Generator::new();
        let mut tasks = Vec::with_capacity(runs.len());
        for (run, created) in runs {
            let args = serde_json::to_vec(&RunJob::new(run)).map_err(queue_error)?;
            // Jobs are fetched by `run_at` (seconds), then id: the run's creation time keeps it
            // ahead of runs created later, and ids from one monotonic generator keep the order
            // within a second.
            let id = ids.generate().map_err(queue_error)?;
            tasks.push(
                apalis_core::task::builder::TaskBuilder::new(args)
                    .task_id(apalis_core::task::task_id::TaskId::from(id))
                    .run_at_timestamp(u64::try_from(created.timestamp()).unwrap_or(0))
                    .build(),
            );
        }
        let queue = self.table.config.queue.as_ref();
        let mut conn = self.table.writer.lock().await;
        let mut tx = conn.begin().await.map_err(queue_error)?;
        sqlx::query(
            "DELETE FROM Jobs WHERE job_type = ?1
               AND (status IN ('Pending', 'Queued', 'Running')
                    OR (status = 'Failed' AND attempts < max_attempts))",
        )
        .bind(queue)
        .execute(&mut *tx)
        .await
        .map_err(queue_error)?;
        queries::push_tasks(&mut *tx, queue, &tasks)
            .await
            .map_err(queue_error)?;
        tx.commit().await.map_err(queue_error)?;
        drop(conn);
        if !tasks.is_empty() {
            self.wake.raise();
        }
        Ok(())
    }

    /// Sets up apalis's tables through the Store's `writer` and opens the queue. `batch` is how
    /// many jobs a fetch may claim: the worker's concurrency, so one worker does not hoard jobs
    /// others could run.
    pub async fn open(writer: &Writer, batch: usize) -> Result<Self, QueueError> {
        // Only the migrations: `SqliteStorage::setup` would also switch the connection it runs on
        // to `synchronous=OFF` and a 256 MB page cache, behind the Store's back.
        SqliteStorage::migrations()
            .run(&mut *writer.lock().await)
            .await
            .map_err(queue_error)?;
        // `lock_tasks(false)`: a fetch already marks its jobs as taken by this worker; the extra
        // write per job that marks them running is not needed (the run's own state is the Store's).
        let config = Config::default()
            .queue(QUEUE_NAME)
            .batch_size(batch.max(1))
            .lock_tasks(false);
        // From now on the Store writes each new run's job with the run.
        let wake = writer
            .carry_jobs(|| JobOutbox {
                queue: QUEUE_NAME.to_string(),
                wake: Arc::new(Wake::default()),
                ids: std::sync::Mutex::new(ulid::Generator::new()),
            })
            .wake
            .clone();
        Ok(SqliteQueue {
            table: JobsTable {
                writer: writer.clone(),
                config,
                acks: Arc::default(),
            },
            wake,
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
        let backend = JobSource {
            persisted: Persisted::new(self.table.clone()),
            codec: JsonCodec::default(),
            wake: self.wake.clone(),
            seen: u64::MAX,
            handed_out: 0,
            tick: Box::pin(tokio::time::sleep(SAFETY_TICK)),
        };
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
        let queue = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CLEAN_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = queue.remove_finished(KEEP_FINISHED).await {
                            tracing::warn!(error = %e, "removing finished jobs failed");
                        }
                    }
                    () = stop.cancelled() => return,
                }
            }
        });
        let table = self.table.clone();
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
            // The acks still waiting for their delayed write.
            if let Err(e) = table.flush_acks().await {
                tracing::warn!(error = %e, "acknowledging finished jobs failed");
            }
        })
    }
}

/// The handler as the worker's shared data (a named type: apalis's handler bounds do not accept
/// a trait object's lifetime directly).
#[derive(Clone)]
struct Handler(Arc<dyn JobHandler>);

/// The worker's service: the handler, on the job. Each job is handled in a task of its own:
/// apalis polls the jobs it runs at once inside its
/// worker's one task, where the runs would take turns on one thread (and with the worker's
/// fetches) instead of running side by side on the runtime's threads.
async fn handle(job: RunJob, handler: Data<Handler>) -> Result<(), BoxDynError> {
    let run = job.run_id.clone();
    let Handler(inner) = &*handler;
    let inner = inner.clone();
    let handled = tokio::spawn(async move { inner.handle(job).await })
        .await
        .unwrap_or_else(|e| Err(format!("the run's task ended: {e}")));
    handled.map_err(|e| {
        tracing::error!(run_id = %run, error = %e, "executing a run failed");
        AbortError::new(e).into()
    })
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn push(&self, job: RunJob) -> Result<(), QueueError> {
        let args = serde_json::to_vec(&job).map_err(queue_error)?;
        let task = apalis_core::task::builder::TaskBuilder::new(args).build();
        self.table
            .clone()
            .push_tasks(vec![task])
            .await
            .map_err(queue_error)?;
        // After the commit: the woken worker's fetch sees the job.
        self.wake.raise();
        Ok(())
    }
}
