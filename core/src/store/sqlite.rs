//! The embedded Store: one SQLite file in WAL mode.
//!
//! `synchronous=NORMAL`: a commit is durable against a process crash (the WAL is written before
//! the call returns) and costs no fsync, which a step-per-millisecond runner needs. A power cut
//! can lose the last commits, never corrupt the file.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::Connection;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use super::{
    Change, ChangeKind, Claim, Created, Delivery, DeliveryOutcome, DeliveryQuery, LogRead, Result,
    RunPage, RunQuery, Store, StoreError, Subject, TakeOver, params_from_json, params_to_json,
};
use crate::ledger::{NewResource, Resource, ResourceQuery, ResourceState, ResourceUpdate};
use crate::run::Phase;
use crate::run::{
    LogChunk, LogStream, NewRun, Run, RunId, RunStatus, StepRecord, StoredChunk, Trigger,
    TriggerKind,
};

const SCHEMA_VERSION: i64 = 9;

/// A run's job in the embedded queue's table (apalis-sqlite's own row, as its `sink.sql` writes
/// it; the values from `JobRow::add_to`, then the run's id), only if the run is there and not
/// held behind its group.
macro_rules! insert_job {
    () => {
        "INSERT INTO Jobs SELECT ?, ?, ?, 'Pending', 0, ?, ?, NULL, NULL, NULL, NULL, ?, ?, NULL
         WHERE EXISTS (SELECT 1 FROM runs WHERE id = ? AND held = 0);\n"
    };
}
/// How often the checkpointer copies the write-ahead log back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The log size (in pages) past which the writer checkpoints by itself.
const WAL_BACKSTOP_PAGES: u32 = 8192;
/// What the write-ahead log file is cut back to each time it starts over after a checkpoint:
/// a burst (or a long read holding a checkpoint back) grows it up to the backstop, and without
/// a limit it would keep that size for good.
const WAL_SIZE_LIMIT: u64 = 4 << 20;

/// Copies the write-ahead log into the database file, on a connection of its own, until the
/// runtime ends. With SQLite's default the writer does this itself every 1,000 pages, inside a
/// commit, with two fsyncs: a run writes some 80 pages, so one commit in ten stalled every write
/// queued behind it. A passive checkpoint runs beside the writer and never blocks it.
async fn checkpoint(options: SqliteConnectOptions) {
    let mut conn = match sqlx::SqliteConnection::connect_with(&options).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "no checkpointer: the writer checkpoints by itself");
            return;
        }
    };
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "checkpointing the database failed");
        }
    }
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        pipeline TEXT NOT NULL,
        number INTEGER NOT NULL,
        status TEXT NOT NULL,
        trigger_kind TEXT NOT NULL,
        trigger_actor TEXT NOT NULL,
        params TEXT NOT NULL,
        source TEXT NOT NULL,
        rerun_of TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        reason TEXT,
        log_len INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        plan TEXT,
        cancel_reason TEXT,
        claim_token INTEGER NOT NULL DEFAULT 0,
        claimed_by TEXT,
        lease_until INTEGER,
        idempotency_key TEXT,
        grp TEXT,
        held INTEGER NOT NULL DEFAULT 0,
        UNIQUE (pipeline, number)
    )",
    "CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, seq)",
    // The last number given in a pipeline, recorded when its runs are deleted.
    "CREATE TABLE IF NOT EXISTS run_numbers (pipeline TEXT PRIMARY KEY, last INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        step_id TEXT NOT NULL,
        name TEXT NOT NULL,
        phase TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        exit_code INTEGER,
        started_at INTEGER,
        finished_at INTEGER,
        reason TEXT,
        outputs TEXT NOT NULL,
        PRIMARY KEY (run_id, idx)
    ) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS log_chunks (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        offset INTEGER NOT NULL,
        step INTEGER,
        len INTEGER NOT NULL,
        at INTEGER,
        stream TEXT
    )",
    "CREATE UNIQUE INDEX IF NOT EXISTS log_chunks_by_offset ON log_chunks (run_id, offset)",
    // The resources ledger. No foreign key to runs: a resource outlives the run that made it
    // (a deployed service), and retention may delete the run first.
    "CREATE TABLE IF NOT EXISTS resources (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        engine TEXT,
        service TEXT,
        run_id TEXT,
        step INTEGER,
        state TEXT NOT NULL,
        external_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER,
        hourly_price REAL
    ) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS resources_by_run ON resources (run_id)",
    "CREATE INDEX IF NOT EXISTS resources_by_service ON resources (service)",
    "CREATE INDEX IF NOT EXISTS resources_by_state ON resources (state, updated_at)",
    "CREATE TABLE IF NOT EXISTS webhook_deliveries (
        key TEXT PRIMARY KEY,
        hook TEXT NOT NULL,
        id TEXT NOT NULL,
        provider TEXT NOT NULL,
        event TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        verified INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT,
        results TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        body_len INTEGER NOT NULL,
        redelivery TEXT
    ) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_by_time ON webhook_deliveries (received_at)",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_by_id ON webhook_deliveries (hook, id)",
    "CREATE TABLE IF NOT EXISTS schedules (key TEXT PRIMARY KEY, last_slot INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS admin (id INTEGER PRIMARY KEY CHECK (id = 1), password_hash TEXT)",
    "CREATE TABLE IF NOT EXISTS api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        last_used_at INTEGER,
        revoked_at INTEGER,
        scope TEXT NOT NULL DEFAULT 'run',
        legacy INTEGER NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS sessions (
        hash TEXT PRIMARY KEY,
        csrf TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS login_links (
        hash TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
    ) WITHOUT ROWID",
];

/// Columns added to tables after their first version: (the schema version that added it, the
/// statement). Chunks written before `at` and `stream` existed read as the run's start and
/// `output`.
const UPGRADES: &[(i64, &str)] = &[
    (
        2,
        "ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    ),
    (3, "ALTER TABLE runs ADD COLUMN plan TEXT"),
    (4, "ALTER TABLE runs ADD COLUMN cancel_reason TEXT"),
    (
        5,
        "ALTER TABLE runs ADD COLUMN claim_token INTEGER NOT NULL DEFAULT 0",
    ),
    (5, "ALTER TABLE runs ADD COLUMN claimed_by TEXT"),
    (5, "ALTER TABLE runs ADD COLUMN lease_until INTEGER"),
    (5, "ALTER TABLE runs ADD COLUMN idempotency_key TEXT"),
    (6, "ALTER TABLE log_chunks ADD COLUMN at INTEGER"),
    (6, "ALTER TABLE log_chunks ADD COLUMN stream TEXT"),
    // Tokens made before scopes keep every power, marked as such.
    (
        7,
        "ALTER TABLE api_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin'",
    ),
    // The first deliveries table (never written: no endpoint received webhooks yet) gave way
    // to `webhook_deliveries`, which logs each arrival with its headers and body.
    (8, "DROP TABLE IF EXISTS deliveries"),
    (
        7,
        "ALTER TABLE api_tokens ADD COLUMN legacy INTEGER NOT NULL DEFAULT 1",
    ),
    // Concurrency groups: a run's group, and whether it waits for it (queued without a job).
    (9, "ALTER TABLE runs ADD COLUMN grp TEXT"),
    (
        9,
        "ALTER TABLE runs ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
    ),
];

/// The embedded Store. Run state lives in SQLite; log bytes live in one append-only file per
/// run beside the database (`logs/<run id>.log`), indexed by offset and step in SQLite. Keeping
/// bulk log bytes out of the WAL halves what a chatty step costs to store (no double write, no
/// checkpoint copy) and lets readers stream with plain positioned reads.
#[derive(Clone)]
pub struct SqliteStore {
    /// The one writer connection, which the queue writes through too.
    pub(super) writer: Writer,
    /// Read-only connections: reads never wait behind writes (WAL).
    pub(super) readers: SqlitePool,
    logs: PathBuf,
    changes: Arc<Feed>,
    /// Deliveries waiting to be logged: whoever gets the writer next for them logs all of them
    /// in one commit (under a burst of webhooks, one commit for many).
    pending_deliveries: Arc<std::sync::Mutex<Vec<PendingDelivery>>>,
}

type PendingDelivery = Delivery;

/// The change feed: numbered in the order changes are announced.
pub(super) struct Feed {
    next: std::sync::Mutex<u64>,
    sender: tokio::sync::broadcast::Sender<Change>,
}

impl Feed {
    fn new() -> Self {
        Feed {
            next: std::sync::Mutex::new(1),
            sender: tokio::sync::broadcast::channel(1024).0,
        }
    }

    fn send(&self, subject: Subject, kind: ChangeKind) {
        // Numbered and sent under one lock, so numbers arrive in order.
        let mut next = match self.next.lock() {
            Ok(n) => n,
            Err(poisoned) => poisoned.into_inner(),
        };
        // No receivers is fine: nobody is following.
        let _ = self.sender.send(Change {
            seq: *next,
            subject,
            kind,
        });
        *next += 1;
    }
}

/// The one connection that writes, shared in order. Writers queue at a fair lock instead of
/// meeting in SQLite's busy handler, whose first retry sleeps a whole millisecond. Not a pool of
/// one: sqlx pings a pooled connection each time it goes back to its pool, a second round trip
/// to the connection's thread for every statement, which the next writer waits out.
#[derive(Clone)]
pub struct Writer {
    conn: Arc<tokio::sync::Mutex<SqliteConnection>>,
    /// The embedded queue, once it is opened on this writer: a new run's job is then written in
    /// the run's own transaction (see [`Store::create_run`]).
    jobs: Arc<std::sync::OnceLock<crate::queue::JobOutbox>>,
    /// The hot writes waiting for the next group commit (see `group_commit.rs`).
    pub(super) queue: Arc<std::sync::Mutex<super::group_commit::Queue>>,
}

impl Writer {
    fn new(conn: SqliteConnection) -> Self {
        Writer {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
            jobs: Arc::default(),
            queue: Arc::default(),
        }
    }

    /// The connection, once the writers before have finished with it.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, SqliteConnection> {
        self.conn.lock().await
    }

    /// The queue's job outbox: `make`'s, or the one a queue opened earlier on this writer set
    /// (every queue on one writer then shares its wake-ups).
    pub(crate) fn carry_jobs(
        &self,
        make: impl FnOnce() -> crate::queue::JobOutbox,
    ) -> &crate::queue::JobOutbox {
        self.jobs.get_or_init(make)
    }
}

/// A transaction that takes the write lock at once. A deferred one that reads first and writes
/// later fails with SQLITE_BUSY_SNAPSHOT when another writer got in between, and the busy
/// timeout cannot help it.
pub(super) async fn write_tx(
    conn: &mut SqliteConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>> {
    conn.begin_with("BEGIN IMMEDIATE").await.map_err(backend)
}

pub(super) fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub(super) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn from_millis(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}

fn corrupt(what: &str) -> impl FnOnce(String) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

/// Deliveries taken to be logged; put back if they were not (see `flush_deliveries`).
struct Batch<'a> {
    items: Vec<PendingDelivery>,
    pending: &'a std::sync::Mutex<Vec<PendingDelivery>>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.items.is_empty() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut self.items);
        }
    }
}

/// Logs deliveries in one transaction.
async fn insert_deliveries<'a>(
    conn: &mut SqliteConnection,
    deliveries: impl Iterator<Item = &'a Delivery>,
) -> Result<()> {
    let mut tx = write_tx(conn).await?;
    for delivery in deliveries {
        sqlx::query(
            "INSERT INTO webhook_deliveries (key, hook, id, provider, event, received_at, verified,
                outcome, reason, results, headers, body, body_len, redelivery)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(&delivery.key)
        .bind(&delivery.hook)
        .bind(&delivery.id)
        .bind(&delivery.provider)
        .bind(&delivery.event)
        .bind(millis(delivery.received_at))
        .bind(delivery.verified)
        .bind(delivery.outcome.as_str())
        .bind(delivery.reason.as_deref())
        .bind(to_json(&delivery.results))
        .bind(to_json(&delivery.headers))
        .bind(&delivery.body)
        .bind(i64::try_from(delivery.body_len).unwrap_or(i64::MAX))
        .bind(delivery.redelivery.as_ref().map(to_json))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    }
    tx.commit().await.map_err(backend)
}

impl SqliteStore {
    /// Opens (creating when missing) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // Checkpoints are the checkpointer's job (below); the writer checkpoints only if the
            // log outgrows this, as a backstop.
            .pragma("wal_autocheckpoint", WAL_BACKSTOP_PAGES.to_string())
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
        let writer = SqliteConnection::connect_with(&options)
            .await
            .map_err(backend)?;
        let logs = path.parent().unwrap_or(Path::new(".")).join("logs");
        std::fs::create_dir_all(&logs)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", logs.display())))?;
        let changes = Arc::new(Feed::new());
        let store = SqliteStore {
            writer: Writer::new(writer),
            readers: SqlitePoolOptions::new()
                .max_connections(4)
                // A ping before each read is a round trip for a file that cannot go away.
                .test_before_acquire(false)
                .connect_lazy_with(options.clone().read_only(true)),
            logs,
            changes,
            pending_deliveries: Arc::default(),
        };
        store.migrate().await?;
        tokio::spawn(checkpoint(options));
        Ok(store)
    }

    fn changed(&self, id: &RunId, kind: ChangeKind) {
        self.changes.send(Subject::Run(id.clone()), kind);
    }

    fn log_path(&self, id: &RunId) -> PathBuf {
        // Run ids are canonical UUIDs (checked by `RunId::from_str`), safe as file names.
        self.logs.join(format!("{id}.log"))
    }

    /// Why a claimed write did not happen: the run is gone, or the claim is not its own.
    async fn stale(&self, claim: &Claim) -> StoreError {
        match self.get_run(&claim.run).await {
            Ok(None) => StoreError::NotFound(claim.run.clone()),
            Ok(Some(_)) => StoreError::StaleClaim {
                id: claim.run.clone(),
                token: claim.token,
            },
            Err(e) => e,
        }
    }

    /// Why a run did not move to `to`: it is gone, or its state does not allow the move.
    async fn not_moved(&self, id: &RunId, to: RunStatus) -> StoreError {
        match self.get_run(id).await {
            Ok(None) => StoreError::NotFound(id.clone()),
            Ok(Some(run)) => StoreError::InvalidTransition {
                id: id.clone(),
                from: run.status,
                to,
            },
            Err(e) => e,
        }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Lets the next run of `group` go, if no run of it is active any more: the oldest held run
    /// is no longer held, and gets its job (with the embedded queue, in the same transaction).
    async fn release_next(&self, conn: &mut SqliteConnection, group: &str) -> Result<()> {
        let mut tx = write_tx(conn).await?;
        let next: Option<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE grp = ?1 AND status = 'queued' AND held = 1
               AND NOT EXISTS (SELECT 1 FROM runs WHERE grp = ?1 AND status IN ('queued', 'running') AND held = 0)
             ORDER BY seq LIMIT 1",
        )
        .bind(group)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(next) = next else {
            return Ok(());
        };
        let id = RunId::from_str(&next).map_err(corrupt("run id"))?;
        sqlx::query("UPDATE runs SET held = 0 WHERE id = ?1")
            .bind(&next)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let outbox = self.writer.jobs.get();
        if let Some(outbox) = outbox {
            let row = outbox
                .row(&id)
                .map_err(|e| StoreError::Backend(format!("the run's job: {e}")))?;
            let mut args = sqlx::sqlite::SqliteArguments::default();
            row.add_to(&mut args)
                .and_then(|()| sqlx::Arguments::add(&mut args, next.as_str()))
                .map_err(|e| StoreError::Backend(format!("the run's job: {e}")))?;
            sqlx::query_with(insert_job!(), args)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        if let Some(outbox) = outbox {
            outbox.pushed();
        }
        self.changed(&id, ChangeKind::Status);
        Ok(())
    }

    /// Lets go the groups whose runs all ended while a held run waits (a crash between a run's
    /// end and the next run's release): at start, before the queue.
    pub async fn release_stuck_groups(&self) -> Result<()> {
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT grp FROM runs WHERE held = 1 AND status = 'queued' AND grp IS NOT NULL",
        )
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        for group in groups {
            let mut conn = self.writer.lock().await;
            self.release_next(&mut conn, &group).await?;
        }
        Ok(())
    }

    /// Logs the deliveries waiting to be, in one commit. Deliveries that fail to be written are
    /// dropped with the error (a row that cannot be written would fail again); a caller that goes
    /// away mid-write leaves them for the next. Returns once every delivery recorded before the
    /// call is committed: one taken by another flush is, once the writer is free again.
    async fn flush_deliveries(&self) -> Result<()> {
        let pending = &*self.pending_deliveries;
        let mut conn = self.writer.lock().await;
        // Declared after the writer's guard, so dropped before it.
        let mut batch = Batch {
            items: std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner())),
            pending,
        };
        // Empty: an earlier holder of the writer logged them.
        if batch.items.is_empty() {
            return Ok(());
        }
        let written = insert_deliveries(&mut conn, batch.items.iter()).await;
        batch.items.clear();
        written
    }

    /// For a clean stop, once nothing writes any more: copies the write-ahead log into the
    /// database and truncates it (a stopped skiff leaves no WAL behind), then closes the
    /// connections.
    pub async fn close(&self) -> Result<()> {
        self.flush_deliveries().await?;
        self.readers.close().await;
        let mut conn = self.writer.lock().await;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = write_tx(&mut conn).await?;
        let version: i64 = sqlx::query("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?
            .get(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "the database has schema version {version}, newer than this skiff knows ({SCHEMA_VERSION})"
            )));
        }
        for statement in SCHEMA {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        // A database made by an older skiff gets the columns that came after it (a new one has
        // them from `SCHEMA`; version 0 is a new file).
        for (since, statement) in UPGRADES {
            if version != 0 && version < *since {
                match sqlx::query(*statement).execute(&mut *tx).await {
                    Ok(_) => {}
                    // A table made anew by `SCHEMA` just now has the column already.
                    Err(e) if e.to_string().contains("duplicate column name") => {}
                    Err(e) => return Err(backend(e)),
                }
            }
        }
        sqlx::query(
            "CREATE UNIQUE INDEX IF NOT EXISTS runs_by_idempotency_key ON runs (pipeline, idempotency_key)
             WHERE idempotency_key IS NOT NULL",
        )
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        // A run's planned steps are written by the same statement that creates the run: one
        // round trip on the path from a trigger to its first step.
        sqlx::query(
            "CREATE TRIGGER IF NOT EXISTS runs_plan_steps AFTER INSERT ON runs WHEN NEW.plan IS NOT NULL
             BEGIN
               INSERT INTO steps (run_id, idx, step_id, name, phase, status, attempt, outputs)
               SELECT NEW.id, value ->> 'i', value ->> 'id', value ->> 'name', value ->> 'phase', 'pending', 0, '{}'
               FROM json_each(NEW.plan);
             END",
        )
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        // SCHEMA_VERSION (a PRAGMA takes no bound value).
        sqlx::query("PRAGMA user_version = 9")
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)
    }
}

/// The committed length of a run's log.
async fn log_len<'e, E: sqlx::Executor<'e, Database = sqlx::Sqlite>>(
    executor: E,
    id: &RunId,
) -> Result<i64> {
    sqlx::query("SELECT log_len FROM runs WHERE id = ?1")
        .bind(id.as_str())
        .fetch_optional(executor)
        .await
        .map_err(backend)?
        .map(|row| row.get(0))
        .ok_or_else(|| StoreError::NotFound(id.clone()))
}

fn run_from_row(row: &SqliteRow) -> Result<Run> {
    let get_s = |c: &str| row.try_get::<String, _>(c).map_err(backend);
    Ok(Run {
        id: RunId::from_str(&get_s("id")?).map_err(corrupt("run id"))?,
        pipeline: get_s("pipeline")?,
        number: row.try_get::<i64, _>("number").map_err(backend)? as u64,
        status: RunStatus::from_str(&get_s("status")?).map_err(corrupt("run status"))?,
        trigger: Trigger {
            kind: TriggerKind::from_str(&get_s("trigger_kind")?).map_err(corrupt("trigger"))?,
            actor: get_s("trigger_actor")?,
        },
        params: params_from_json(&get_s("params")?)?,
        source: get_s("source")?,
        rerun_of: row
            .try_get::<Option<String>, _>("rerun_of")
            .map_err(backend)?
            .map(|s| RunId::from_str(&s).map_err(corrupt("rerun_of")))
            .transpose()?,
        created_at: from_millis(row.try_get("created_at").map_err(backend)?).unwrap_or_default(),
        started_at: from_millis(row.try_get("started_at").map_err(backend)?),
        finished_at: from_millis(row.try_get("finished_at").map_err(backend)?),
        reason: row.try_get("reason").map_err(backend)?,
        log_len: row.try_get::<i64, _>("log_len").map_err(backend)? as u64,
        cancel_requested: row.try_get::<i64, _>("cancel_requested").map_err(backend)? != 0,
        cancel_reason: row.try_get("cancel_reason").map_err(backend)?,
        claimed_by: row.try_get("claimed_by").map_err(backend)?,
        lease_until: from_millis(row.try_get("lease_until").map_err(backend)?),
        idempotency_key: row.try_get("idempotency_key").map_err(backend)?,
        group: row.try_get("grp").map_err(backend)?,
        held: row.try_get::<i64, _>("held").map_err(backend)? != 0,
    })
}

fn step_from_row(row: &SqliteRow) -> Result<StepRecord> {
    let phase: String = row.try_get("phase").map_err(backend)?;
    let status: String = row.try_get("status").map_err(backend)?;
    let outputs: String = row.try_get("outputs").map_err(backend)?;
    Ok(StepRecord {
        index: row.try_get::<i64, _>("idx").map_err(backend)? as u32,
        id: row.try_get("step_id").map_err(backend)?,
        name: row.try_get("name").map_err(backend)?,
        phase: if phase == "finally" {
            Phase::Finally
        } else {
            Phase::Main
        },
        status: status.parse().map_err(corrupt("step status"))?,
        attempt: row.try_get::<i64, _>("attempt").map_err(backend)? as u32,
        exit_code: row.try_get("exit_code").map_err(backend)?,
        started_at: from_millis(row.try_get("started_at").map_err(backend)?),
        finished_at: from_millis(row.try_get("finished_at").map_err(backend)?),
        reason: row.try_get("reason").map_err(backend)?,
        outputs: params_from_json(&outputs)?,
    })
}

macro_rules! run_columns {
    () => {
        concat!(
            "seq, id, pipeline, number, status, trigger_kind, trigger_actor, params, source, ",
            "rerun_of, created_at, started_at, finished_at, reason, log_len, cancel_requested, ",
            "cancel_reason, claim_token, claimed_by, lease_until, idempotency_key, grp, held"
        )
    };
}

/// A `SELECT` of every run column, followed by `$tail`.
macro_rules! select_runs {
    ($tail:literal) => {
        concat!("SELECT ", run_columns!(), " FROM runs ", $tail)
    };
}

macro_rules! resource_columns {
    () => {
        "id, kind, name, engine, service, run_id, step, state, external_id, created_at, updated_at, expires_at, hourly_price"
    };
}

macro_rules! select_resources {
    ($tail:literal) => {
        concat!("SELECT ", resource_columns!(), " FROM resources ", $tail)
    };
}

/// A `SELECT` of every delivery column, followed by `$tail`.
macro_rules! select_deliveries {
    ($tail:literal) => {
        concat!(
            "SELECT key, hook, id, provider, event, received_at, verified, outcome, reason, ",
            "results, headers, body, body_len, redelivery FROM webhook_deliveries ",
            $tail
        )
    };
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Plain data (strings, numbers, lists) always serializes.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn delivery_from_row(row: &SqliteRow) -> Result<Delivery> {
    fn json<T: serde::de::DeserializeOwned>(row: &SqliteRow, column: &str) -> Result<T> {
        let text: String = row.try_get(column).map_err(backend)?;
        serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("delivery {column}: {e}")))
    }
    let outcome: String = row.try_get("outcome").map_err(backend)?;
    let redelivery: Option<String> = row.try_get("redelivery").map_err(backend)?;
    Ok(Delivery {
        key: row.try_get("key").map_err(backend)?,
        hook: row.try_get("hook").map_err(backend)?,
        id: row.try_get("id").map_err(backend)?,
        provider: row.try_get("provider").map_err(backend)?,
        event: row.try_get("event").map_err(backend)?,
        received_at: from_millis(row.try_get("received_at").map_err(backend)?).unwrap_or_default(),
        verified: row.try_get("verified").map_err(backend)?,
        outcome: DeliveryOutcome::parse(&outcome)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery outcome `{outcome}`")))?,
        reason: row.try_get("reason").map_err(backend)?,
        results: json(row, "results")?,
        headers: json(row, "headers")?,
        body: row.try_get("body").map_err(backend)?,
        body_len: u64::try_from(row.try_get::<i64, _>("body_len").map_err(backend)?).unwrap_or(0),
        redelivery: redelivery
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("delivery redelivery: {e}")))
            })
            .transpose()?,
    })
}

fn resource_from_row(row: &SqliteRow) -> Result<Resource> {
    let state: String = row.try_get("state").map_err(backend)?;
    let run: Option<String> = row.try_get("run_id").map_err(backend)?;
    Ok(Resource {
        id: row.try_get("id").map_err(backend)?,
        kind: row.try_get("kind").map_err(backend)?,
        name: row.try_get("name").map_err(backend)?,
        engine: row.try_get("engine").map_err(backend)?,
        service: row.try_get("service").map_err(backend)?,
        run: run
            .map(|r| RunId::from_str(&r).map_err(corrupt("resource run")))
            .transpose()?,
        step: row
            .try_get::<Option<i64>, _>("step")
            .map_err(backend)?
            .map(|s| s as u32),
        state: state.parse().map_err(corrupt("resource state"))?,
        external_id: row.try_get("external_id").map_err(backend)?,
        created_at: from_millis(row.try_get("created_at").map_err(backend)?).unwrap_or_default(),
        updated_at: from_millis(row.try_get("updated_at").map_err(backend)?).unwrap_or_default(),
        expires_at: from_millis(row.try_get("expires_at").map_err(backend)?),
        hourly_price: row.try_get("hourly_price").map_err(backend)?,
    })
}

/// Whether `claim` is still its run's (inside a write transaction).
async fn holds(conn: &mut SqliteConnection, claim: &Claim) -> Result<bool> {
    Ok(
        sqlx::query("SELECT 1 FROM runs WHERE id = ?1 AND status = 'running' AND claim_token = ?2")
            .bind(claim.run.as_str())
            .bind(token_of(claim))
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?
            .is_some(),
    )
}

/// A claimed run and its claim, from a row of every run column.
fn claim_from_row(row: &SqliteRow) -> Result<(Run, Claim)> {
    let run = run_from_row(row)?;
    let token: i64 = row.try_get("claim_token").map_err(backend)?;
    let claim = Claim {
        run: run.id.clone(),
        worker: run.claimed_by.clone().unwrap_or_default(),
        token: u64::try_from(token).unwrap_or(0),
        expires_at: run.lease_until.unwrap_or_default(),
    };
    Ok((run, claim))
}

fn token_of(claim: &Claim) -> i64 {
    i64::try_from(claim.token).unwrap_or(i64::MAX)
}

/// The hot writes, for the group commit (`group_commit.rs`): positional parameters only.
mod hot {
    use super::super::group_commit::{Answer, BindError, Kind, Write, add};
    use super::Result;
    use sqlx::sqlite::{SqliteArguments, SqliteRow};

    /// The first row of the last statement's answer.
    fn returned(mut answers: Vec<Answer>) -> Option<SqliteRow> {
        answers.pop().and_then(|a| a.rows.into_iter().next())
    }

    /// A new run, and with the embedded queue its job, in the same transaction (never a run
    /// without its job). The number is past every run of the pipeline and past `run_numbers`,
    /// the high-water mark kept for numbers of runs that were deleted, so a number is never
    /// given twice. A key the pipeline has seen inserts nothing (and no job: the job is
    /// inserted only if its run was, and is not held).
    pub(super) struct Create {
        pub run: String,
        pub pipeline: String,
        pub kind: &'static str,
        pub actor: String,
        pub params: String,
        pub source: String,
        pub rerun_of: Option<String>,
        pub created_at: i64,
        pub plan: String,
        pub key: Option<String>,
        pub group: Option<String>,
        pub job: Option<crate::queue::JobRow>,
    }

    macro_rules! insert_run {
        () => {
            "INSERT INTO runs (id, pipeline, number, status, trigger_kind, trigger_actor, params, source, rerun_of, created_at, plan, idempotency_key, grp, held)
             VALUES (?, ?, 1 + MAX(
                 COALESCE((SELECT MAX(number) FROM runs WHERE pipeline = ?), 0),
                 COALESCE((SELECT last FROM run_numbers WHERE pipeline = ?), 0)),
               'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?,
               CASE WHEN ? IS NULL THEN 0
                    ELSE EXISTS (SELECT 1 FROM runs WHERE grp = ? AND status IN ('queued', 'running')) END)
             ON CONFLICT (pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING number, held;\n"
        };
    }

    impl Write for Create {
        fn kind(&self) -> Kind {
            Kind::NewRun
        }

        /// The run's number, and whether it is held behind its group; `None`: the key was seen.
        type Out = Option<(i64, bool)>;

        fn sql(&self) -> (&'static str, usize) {
            match self.job {
                None => (insert_run!(), 1),
                Some(_) => (concat!(insert_run!(), insert_job!()), 2),
            }
        }

        fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            add(args, self.run.as_str())?;
            for _ in 0..3 {
                add(args, self.pipeline.as_str())?;
            }
            add(args, self.kind)?;
            add(args, self.actor.as_str())?;
            add(args, self.params.as_str())?;
            add(args, self.source.as_str())?;
            add(args, self.rerun_of.as_deref())?;
            add(args, self.created_at)?;
            add(args, self.plan.as_str())?;
            add(args, self.key.as_deref())?;
            for _ in 0..3 {
                add(args, self.group.as_deref())?;
            }
            if let Some(job) = &self.job {
                job.add_to(args)?;
                add(args, self.run.as_str())?;
            }
            Ok(())
        }

        fn read(self, mut answers: Vec<Answer>) -> Result<Self::Out> {
            if self.job.is_some() {
                answers.pop();
            }
            use sqlx::Row;
            returned(answers)
                .map(|row| {
                    Ok((
                        row.try_get::<i64, _>(0).map_err(super::backend)?,
                        row.try_get::<i64, _>(1).map_err(super::backend)? != 0,
                    ))
                })
                .transpose()
        }
    }

    /// A queued run taken: one statement, from `queued` only.
    pub(super) struct Claim {
        pub run: String,
        pub now: i64,
        pub worker: String,
        pub until: i64,
    }

    impl Write for Claim {
        fn kind(&self) -> Kind {
            Kind::Claim
        }

        type Out = Option<SqliteRow>;

        fn sql(&self) -> (&'static str, usize) {
            (
                concat!(
                    "UPDATE runs SET status = 'running', started_at = ?, claim_token = claim_token + 1,
                        claimed_by = ?, lease_until = ?
                     WHERE id = ? AND status = 'queued' AND held = 0 RETURNING ",
                    run_columns!(),
                    ";\n"
                ),
                1,
            )
        }

        fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            add(args, self.now)?;
            add(args, self.worker.as_str())?;
            add(args, self.until)?;
            add(args, self.run.as_str())
        }

        fn read(self, answers: Vec<Answer>) -> Result<Self::Out> {
            Ok(returned(answers))
        }
    }

    /// A step's record, under the run's current claim.
    pub(super) struct Step {
        pub run: String,
        pub token: i64,
        pub index: i64,
        pub status: &'static str,
        pub attempt: i64,
        pub exit_code: Option<i32>,
        pub started_at: Option<i64>,
        pub finished_at: Option<i64>,
        pub reason: Option<String>,
        pub outputs: String,
    }

    impl Write for Step {
        fn droppable(&self) -> bool {
            true
        }

        fn kind(&self) -> Kind {
            Kind::Step
        }

        /// Whether it was written (the claim held).
        type Out = bool;

        fn sql(&self) -> (&'static str, usize) {
            (
                "UPDATE steps SET status = ?, attempt = ?, exit_code = ?, started_at = ?, finished_at = ?,
                    reason = ?, outputs = ?
                 WHERE run_id = ? AND idx = ?
                   AND EXISTS (SELECT 1 FROM runs WHERE id = ? AND status = 'running' AND claim_token = ?);\n",
                1,
            )
        }

        fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            add(args, self.status)?;
            add(args, self.attempt)?;
            add(args, self.exit_code)?;
            add(args, self.started_at)?;
            add(args, self.finished_at)?;
            add(args, self.reason.as_deref())?;
            add(args, self.outputs.as_str())?;
            add(args, self.run.as_str())?;
            add(args, self.index)?;
            add(args, self.run.as_str())?;
            add(args, self.token)
        }

        fn read(self, answers: Vec<Answer>) -> Result<Self::Out> {
            Ok(answers.first().is_some_and(|a| a.changes > 0))
        }
    }

    /// A run's end, with the step records held for it (a JSON array), both fenced by the claim.
    pub(super) struct Finish {
        pub run: String,
        pub token: i64,
        pub status: &'static str,
        pub ended: i64,
        pub reason: Option<String>,
        pub steps: Option<String>,
    }

    macro_rules! finish {
        () => {
            concat!(
                "UPDATE runs SET status = ?, finished_at = ?, reason = ?, lease_until = NULL
                 WHERE id = ? AND status = 'running' AND claim_token = ? RETURNING ",
                run_columns!(),
                ";\n"
            )
        };
    }

    impl Write for Finish {
        fn kind(&self) -> Kind {
            Kind::Finish
        }

        /// The run as ended; `None`: the claim did not hold.
        type Out = Option<SqliteRow>;

        fn sql(&self) -> (&'static str, usize) {
            match self.steps {
                None => (finish!(), 1),
                Some(_) => (
                    concat!(
                        "UPDATE steps SET status = s.value ->> 'status', attempt = s.value ->> 'attempt',
                            exit_code = s.value ->> 'exit_code', started_at = s.value ->> 'started_at',
                            finished_at = s.value ->> 'finished_at', reason = s.value ->> 'reason',
                            outputs = s.value ->> 'outputs'
                         FROM json_each(?) AS s
                         WHERE steps.run_id = ? AND steps.idx = s.value ->> 'idx'
                           AND EXISTS (SELECT 1 FROM runs WHERE id = ? AND status = 'running' AND claim_token = ?);\n",
                        finish!()
                    ),
                    2,
                ),
            }
        }

        fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            if let Some(steps) = &self.steps {
                add(args, steps.as_str())?;
                add(args, self.run.as_str())?;
                add(args, self.run.as_str())?;
                add(args, self.token)?;
            }
            add(args, self.status)?;
            add(args, self.ended)?;
            add(args, self.reason.as_deref())?;
            add(args, self.run.as_str())?;
            add(args, self.token)
        }

        fn read(self, answers: Vec<Answer>) -> Result<Self::Out> {
            Ok(returned(answers))
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_run(&self, new: NewRun) -> Result<Created> {
        let id = RunId::generate();
        let now = Utc::now();
        // Every planned step, for the `runs_plan_steps` trigger.
        let plan: Vec<serde_json::Value> = new
            .steps
            .iter()
            .map(|p| serde_json::json!({ "i": p.index, "id": p.id, "name": p.name, "phase": p.phase.as_str() }))
            .collect();
        // The run, and through the trigger its steps, in one statement; with the embedded queue
        // on this writer, the run's job too (apalis-sqlite's own row, as its `sink.sql` writes
        // it), in the same transaction.
        let outbox = self.writer.jobs.get();
        let job = outbox
            .map(|o| o.row(&id))
            .transpose()
            .map_err(|e| StoreError::Backend(format!("the run's job: {e}")))?;
        let inserted = self
            .writer
            .write(hot::Create {
                run: id.to_string(),
                pipeline: new.pipeline.clone(),
                kind: new.trigger.kind.as_str(),
                actor: new.trigger.actor.clone(),
                params: params_to_json(&new.params),
                source: new.source.clone(),
                rerun_of: new.rerun_of.as_ref().map(|r| r.as_str().to_string()),
                created_at: millis(now),
                plan: serde_json::Value::Array(plan).to_string(),
                key: new.idempotency_key.clone(),
                group: new.group.clone(),
                job,
            })
            .await?;
        let Some((number, held)) = inserted else {
            // A key the pipeline has seen: the run it made (committed before this answer).
            let row = sqlx::query(select_runs!("WHERE pipeline = ?1 AND idempotency_key = ?2"))
                .bind(&new.pipeline)
                .bind(new.idempotency_key.as_deref())
                .fetch_one(&self.readers)
                .await
                .map_err(backend)?;
            return Ok(Created {
                run: run_from_row(&row)?,
                created: false,
                queued: false,
            });
        };
        if let Some(outbox) = outbox
            && !held
        {
            // After the commit: the woken worker's fetch sees the job.
            outbox.pushed();
        }
        self.changed(&id, ChangeKind::Status);
        Ok(Created {
            run: Run {
                id,
                pipeline: new.pipeline,
                number: number as u64,
                status: RunStatus::Queued,
                trigger: new.trigger,
                params: new.params,
                source: new.source,
                rerun_of: new.rerun_of,
                created_at: from_millis(Some(millis(now))).unwrap_or(now),
                started_at: None,
                finished_at: None,
                reason: None,
                log_len: 0,
                cancel_requested: false,
                cancel_reason: None,
                claimed_by: None,
                lease_until: None,
                idempotency_key: new.idempotency_key,
                group: new.group,
                held,
            },
            created: true,
            queued: outbox.is_some() && !held,
        })
    }

    async fn get_run(&self, id: &RunId) -> Result<Option<Run>> {
        let row = sqlx::query(select_runs!("WHERE id = ?1"))
            .bind(id.as_str())
            .fetch_optional(&self.readers)
            .await
            .map_err(backend)?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage> {
        const Q: &str = select_runs!(
            "WHERE (?1 IS NULL OR pipeline = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR seq < ?3) \
             ORDER BY seq DESC LIMIT ?4"
        );
        let limit = match query.limit {
            0 => super::DEFAULT_PAGE,
            n => n.min(super::MAX_PAGE),
        };
        let before: Option<i64> = match &query.cursor {
            None => None,
            Some(c) => Some(
                c.parse()
                    .ok()
                    .filter(|n: &i64| *n > 0)
                    .ok_or_else(|| StoreError::BadCursor(c.clone()))?,
            ),
        };
        let rows = sqlx::query(Q)
            .bind(query.pipeline.as_deref())
            .bind(query.status.map(RunStatus::as_str))
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.readers)
            .await
            .map_err(backend)?;
        let more = rows.len() > limit as usize;
        let mut runs = Vec::with_capacity(rows.len().min(limit as usize));
        let mut last_seq = 0i64;
        for row in rows.iter().take(limit as usize) {
            last_seq = row.try_get("seq").map_err(backend)?;
            runs.push(run_from_row(row)?);
        }
        Ok(RunPage {
            runs,
            next: more.then(|| last_seq.to_string()),
        })
    }

    async fn steps(&self, id: &RunId) -> Result<Vec<StepRecord>> {
        let rows = sqlx::query(
            "SELECT idx, step_id, name, phase, status, attempt, exit_code, started_at, finished_at, reason, outputs
             FROM steps WHERE run_id = ?1 ORDER BY idx",
        )
        .bind(id.as_str())
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        rows.iter().map(step_from_row).collect()
    }

    async fn claim_run(
        &self,
        id: &RunId,
        worker: &str,
        lease: std::time::Duration,
    ) -> Result<(Run, Claim)> {
        // One statement: it takes the run only from `queued`. Claiming is on the path from a
        // trigger to its first step, so it costs one round trip.
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let row = self
            .writer
            .write(hot::Claim {
                run: id.to_string(),
                now: millis(now),
                worker: worker.to_owned(),
                until: millis(until),
            })
            .await?;
        match row {
            Some(row) => {
                self.changed(id, ChangeKind::Status);
                claim_from_row(&row)
            }
            None => Err(self.not_moved(id, RunStatus::Running).await),
        }
    }

    async fn take_over_run(
        &self,
        id: &RunId,
        worker: &str,
        lease: std::time::Duration,
        when: TakeOver,
    ) -> Result<(Run, Claim)> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let row = sqlx::query(concat!(
            "UPDATE runs SET claim_token = claim_token + 1, claimed_by = ?2, lease_until = ?3
             WHERE id = ?1 AND status = 'running' AND (?4 OR COALESCE(lease_until, 0) < ?5)
             RETURNING ",
            run_columns!()
        ))
        .bind(id.as_str())
        .bind(worker)
        .bind(millis(until))
        .bind(when == TakeOver::Any)
        .bind(millis(now))
        .fetch_optional(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        if let Some(row) = row {
            self.changed(id, ChangeKind::Status);
            return claim_from_row(&row);
        }
        match self.get_run(id).await? {
            None => Err(StoreError::NotFound(id.clone())),
            Some(run) if run.status == RunStatus::Running => Err(StoreError::Held {
                id: id.clone(),
                worker: run.claimed_by.unwrap_or_default(),
                until: run.lease_until.unwrap_or(now),
            }),
            Some(run) => Err(StoreError::InvalidTransition {
                id: id.clone(),
                from: run.status,
                to: RunStatus::Running,
            }),
        }
    }

    async fn release_run(&self, claim: &Claim) -> Result<Run> {
        let row = sqlx::query(concat!(
            "UPDATE runs SET status = 'queued', started_at = NULL, claim_token = claim_token + 1,
                claimed_by = NULL, lease_until = NULL
             WHERE id = ?1 AND status = 'running' AND claim_token = ?2
               AND NOT EXISTS (SELECT 1 FROM steps WHERE run_id = ?1 AND status != 'pending')
             RETURNING ",
            run_columns!()
        ))
        .bind(claim.run.as_str())
        .bind(token_of(claim))
        .fetch_optional(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        if let Some(row) = row {
            self.changed(&claim.run, ChangeKind::Status);
            return Ok(claim_from_row(&row)?.0);
        }
        // Not moved: a step started under this claim, or the claim is no longer the run's.
        let now: Option<(String, i64)> =
            sqlx::query_as("SELECT status, claim_token FROM runs WHERE id = ?1")
                .bind(claim.run.as_str())
                .fetch_optional(&self.readers)
                .await
                .map_err(backend)?;
        match now {
            None => Err(StoreError::NotFound(claim.run.clone())),
            Some((status, token)) if status == "running" && token == token_of(claim) => {
                Err(StoreError::InvalidTransition {
                    id: claim.run.clone(),
                    from: RunStatus::Running,
                    to: RunStatus::Queued,
                })
            }
            Some(_) => Err(StoreError::StaleClaim {
                id: claim.run.clone(),
                token: claim.token,
            }),
        }
    }

    async fn renew_claim(&self, claim: &Claim, lease: std::time::Duration) -> Result<Claim> {
        let until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let done = sqlx::query(
            "UPDATE runs SET lease_until = ?3 WHERE id = ?1 AND status = 'running' AND claim_token = ?2",
        )
        .bind(claim.run.as_str())
        .bind(token_of(claim))
        .bind(millis(until))
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(self.stale(claim).await);
        }
        Ok(Claim {
            expires_at: from_millis(Some(millis(until))).unwrap_or(until),
            ..claim.clone()
        })
    }

    async fn finish_run(
        &self,
        claim: &Claim,
        steps: &[StepRecord],
        status: RunStatus,
        reason: Option<&str>,
    ) -> Result<Run> {
        if !RunStatus::Running.can_move_to(status) {
            return Err(StoreError::InvalidTransition {
                id: claim.run.clone(),
                from: RunStatus::Running,
                to: status,
            });
        }
        let records: Vec<serde_json::Value> = steps
            .iter()
            .map(|step| {
                serde_json::json!({
                    "idx": step.index,
                    "status": step.status.as_str(),
                    "attempt": step.attempt,
                    "exit_code": step.exit_code,
                    "started_at": step.started_at.map(millis),
                    "finished_at": step.finished_at.map(millis),
                    "reason": step.reason,
                    "outputs": params_to_json(&step.outputs),
                })
            })
            .collect();
        let row = self
            .writer
            .write(hot::Finish {
                run: claim.run.to_string(),
                token: token_of(claim),
                status: status.as_str(),
                ended: millis(Utc::now()),
                reason: reason.map(str::to_owned),
                steps: (!steps.is_empty()).then(|| serde_json::Value::Array(records).to_string()),
            })
            .await?;
        let Some(row) = row else {
            return Err(self.stale(claim).await);
        };
        let run = run_from_row(&row)?;
        for _ in steps {
            self.changed(&claim.run, ChangeKind::Step);
        }
        self.changed(&claim.run, ChangeKind::Status);
        if let Some(group) = &run.group {
            // Right after the end's commit (a crash in between is mended at the next start).
            let mut conn = self.writer.lock().await;
            self.release_next(&mut conn, group).await?;
        }
        Ok(run)
    }

    async fn update_step(&self, claim: &Claim, step: &StepRecord) -> Result<()> {
        // Written only under the run's current claim.
        let written = self
            .writer
            .write(hot::Step {
                run: claim.run.to_string(),
                token: token_of(claim),
                index: i64::from(step.index),
                status: step.status.as_str(),
                attempt: i64::from(step.attempt),
                exit_code: step.exit_code,
                started_at: step.started_at.map(millis),
                finished_at: step.finished_at.map(millis),
                reason: step.reason.clone(),
                outputs: params_to_json(&step.outputs),
            })
            .await?;
        if !written {
            return Err(self.stale(claim).await);
        }
        self.changed(&claim.run, ChangeKind::Step);
        Ok(())
    }

    async fn append_logs(&self, claim: &Claim, chunks: &[LogChunk]) -> Result<u64> {
        let id = &claim.run;
        let mut conn = self.writer.lock().await;
        let mut tx = write_tx(&mut conn).await?;
        let len: Option<i64> = sqlx::query(
            "SELECT log_len FROM runs WHERE id = ?1 AND status = 'running' AND claim_token = ?2",
        )
        .bind(id.as_str())
        .bind(token_of(claim))
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?
        .map(|row| row.get(0));
        let Some(len) = len else {
            drop(tx);
            drop(conn);
            return Err(self.stale(claim).await);
        };
        let total: usize = chunks.iter().map(|c| c.data.len()).sum();
        if total == 0 {
            return Ok(len as u64);
        }
        // The bytes go to the file first, at the committed length: bytes a crash left past it
        // are overwritten, and a reader never reads past the committed length.
        let mut data = Vec::with_capacity(total);
        chunks.iter().for_each(|c| data.extend_from_slice(&c.data));
        let path = self.log_path(id);
        let at = len as u64;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)?;
            file.write_all_at(&data, at)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
        .map_err(|e| StoreError::Backend(format!("writing the log of run {id}: {e}")))?;
        let mut offset = len;
        for chunk in chunks.iter().filter(|c| !c.data.is_empty()) {
            sqlx::query(
                "INSERT INTO log_chunks (run_id, offset, step, len, at, stream) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(id.as_str())
            .bind(offset)
            .bind(chunk.step.map(i64::from))
            .bind(chunk.data.len() as i64)
            .bind(millis(chunk.at))
            .bind(chunk.stream.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            offset += chunk.data.len() as i64;
        }
        sqlx::query("UPDATE runs SET log_len = ?2 WHERE id = ?1")
            .bind(id.as_str())
            .bind(offset)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        self.changed(id, ChangeKind::Log);
        Ok(offset as u64)
    }

    async fn read_logs(&self, id: &RunId, offset: u64, max_bytes: usize) -> Result<LogRead> {
        let mut conn = self.readers.acquire().await.map_err(backend)?;
        let len: i64 = log_len(&mut *conn, id).await?;
        let len = len as u64;
        if offset > len {
            return Err(StoreError::OffsetOutOfRange { offset, len });
        }
        let offset_i = i64::try_from(offset).unwrap_or(i64::MAX);
        // The chunk holding `offset`, then the ones after it.
        let rows = sqlx::query(
            "SELECT offset, step, len, at, stream FROM log_chunks WHERE run_id = ?1 AND offset >= COALESCE(
                 (SELECT MAX(offset) FROM log_chunks WHERE run_id = ?1 AND offset <= ?2), 0)
             ORDER BY offset LIMIT 1024",
        )
        .bind(id.as_str())
        .bind(offset_i)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
        drop(conn);
        // Pieces (offset, step, length, readable length) clipped to the requested range and
        // size. Only the first piece can be cut short of its chunk's end.
        let mut pieces: Vec<(u64, Option<u32>, usize, usize, LogStream, DateTime<Utc>)> =
            Vec::new();
        let mut total = 0usize;
        for row in rows {
            let start = row.try_get::<i64, _>("offset").map_err(backend)? as u64;
            let step: Option<i64> = row.try_get("step").map_err(backend)?;
            let chunk_len = row.try_get::<i64, _>("len").map_err(backend)? as u64;
            let at = from_millis(row.try_get("at").map_err(backend)?).unwrap_or_default();
            let stream = row
                .try_get::<Option<String>, _>("stream")
                .map_err(backend)?
                .map_or(Ok(LogStream::Output), |s| s.parse())
                .map_err(corrupt("log stream"))?;
            if start >= len {
                // Appended after the length was read: the next read gets it.
                break;
            }
            let end = (start + chunk_len).min(len);
            if end <= offset {
                continue;
            }
            let from = start.max(offset);
            let readable = (end - from) as usize;
            let mut size = readable;
            if total > 0 && total + size > max_bytes {
                break;
            }
            if total == 0 && size > max_bytes.max(1) {
                size = max_bytes.max(1);
            }
            total += size;
            pieces.push((from, step.map(|s| s as u32), size, readable, stream, at));
            if total >= max_bytes {
                break;
            }
        }
        if pieces.is_empty() {
            return Ok(LogRead {
                chunks: Vec::new(),
                next_offset: offset,
                len,
            });
        }
        let path = self.log_path(id);
        let chunks = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<StoredChunk>> {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&path)?;
            pieces
                .into_iter()
                .map(|(from, step, size, readable, stream, at)| {
                    // A piece cut short ends between two characters, never inside one (a piece
                    // is decoded on its own): read a character's worth more, then cut.
                    let mut data = vec![0u8; (size + 3).min(readable)];
                    file.read_exact_at(&mut data, from)?;
                    if size < readable {
                        data.truncate(crate::utf8::cut_at_char(&data, size));
                    } else {
                        data.truncate(size);
                    }
                    Ok(StoredChunk {
                        offset: from,
                        step,
                        stream,
                        at,
                        data,
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
        .map_err(|e| StoreError::Corrupt(format!("reading the log of run {id}: {e}")))?;
        let next_offset = chunks
            .last()
            .map_or(offset, |c| c.offset + c.data.len() as u64);
        Ok(LogRead {
            chunks,
            next_offset,
            len,
        })
    }

    async fn request_cancel(&self, id: &RunId, reason: &str) -> Result<Run> {
        let mut conn = self.writer.lock().await;
        let mut tx = write_tx(&mut conn).await?;
        sqlx::query(
            "UPDATE runs SET
                cancel_requested = CASE WHEN status IN ('queued', 'running') THEN 1 ELSE cancel_requested END,
                cancel_reason = CASE WHEN status IN ('queued', 'running') AND cancel_requested = 0 THEN ?3 ELSE cancel_reason END,
                status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
                finished_at = CASE WHEN status = 'queued' THEN ?2 ELSE finished_at END,
                reason = CASE WHEN status = 'queued' THEN ?3 ELSE reason END
             WHERE id = ?1",
        )
        .bind(id.as_str())
        .bind(millis(Utc::now()))
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let row = sqlx::query(select_runs!("WHERE id = ?1"))
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let run = run_from_row(&row)?;
        if run.status == RunStatus::Cancelled {
            // A queued run's steps never start.
            sqlx::query("UPDATE steps SET status = 'skipped', reason = 'run cancelled' WHERE run_id = ?1 AND status = 'pending'")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        self.changed(id, ChangeKind::Cancel);
        if let (Some(group), RunStatus::Cancelled) = (&run.group, run.status) {
            self.release_next(&mut conn, group).await?;
        }
        Ok(run)
    }

    async fn prune_runs(&self, prune: &super::Prune) -> Result<Vec<RunId>> {
        // In batches: one transaction holds the writer, and the runs that queue behind it, only
        // briefly.
        const BATCH: i64 = 200;
        let before = prune.finished_before.map(millis);
        let keep = prune.keep_last.map(i64::from);
        let mut deleted = Vec::new();
        loop {
            let mut conn = self.writer.lock().await;
            let mut tx = write_tx(&mut conn).await?;
            // The pipeline's highest number, kept so that numbers are not given twice.
            sqlx::query(
                "INSERT INTO run_numbers (pipeline, last)
                 SELECT ?1, MAX(number) FROM runs WHERE pipeline = ?1 HAVING MAX(number) IS NOT NULL
                 ON CONFLICT (pipeline) DO UPDATE SET last = MAX(last, excluded.last)",
            )
            .bind(&prune.pipeline)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            let rows = sqlx::query(
                "DELETE FROM runs WHERE seq IN (
                   SELECT seq FROM runs
                   WHERE pipeline = ?1 AND status NOT IN ('queued', 'running')
                     AND ((?2 IS NOT NULL AND finished_at < ?2)
                       OR (?3 IS NOT NULL AND seq < COALESCE((
                             SELECT MIN(seq) FROM (
                               SELECT seq FROM runs
                               WHERE pipeline = ?1 AND status NOT IN ('queued', 'running')
                               ORDER BY seq DESC LIMIT ?3)), -1)))
                   ORDER BY seq LIMIT ?4)
                 RETURNING id",
            )
            .bind(&prune.pipeline)
            .bind(before)
            .bind(keep)
            .bind(BATCH)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            drop(conn);
            let batch: Vec<RunId> = rows
                .iter()
                .filter_map(|r| r.try_get::<String, _>(0).ok())
                .filter_map(|id| RunId::from_str(&id).ok())
                .collect();
            for id in &batch {
                // The index rows went with the run; the bytes go now.
                match std::fs::remove_file(self.log_path(id)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(run_id = %id, error = %e, "removing a log failed"),
                }
                self.changed(id, ChangeKind::Deleted);
            }
            let done = (rows.len() as i64) < BATCH;
            deleted.extend(batch);
            if done {
                return Ok(deleted);
            }
        }
    }

    async fn pipelines_with_runs(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT DISTINCT pipeline FROM runs ORDER BY pipeline")
            .fetch_all(&self.readers)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(backend))
            .collect()
    }

    async fn record_resource(&self, claim: Option<&Claim>, new: NewResource) -> Result<Resource> {
        let now = millis(Utc::now());
        let mut conn = self.writer.lock().await;
        let mut tx = write_tx(&mut conn).await?;
        if let Some(claim) = claim
            && !holds(&mut tx, claim).await?
        {
            drop(tx);
            drop(conn);
            return Err(self.stale(claim).await);
        }
        sqlx::query(
            "INSERT INTO resources (id, kind, name, engine, service, run_id, step, state, created_at, updated_at, expires_at, hourly_price)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'creating', ?8, ?8, ?9, ?10)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&new.id)
        .bind(&new.kind)
        .bind(&new.name)
        .bind(new.engine.as_deref())
        .bind(new.service.as_deref())
        .bind(new.run.as_ref().map(RunId::as_str))
        .bind(new.step.map(i64::from))
        .bind(now)
        .bind(new.expires_at.map(millis))
        .bind(new.hourly_price)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let row = sqlx::query(select_resources!("WHERE id = ?1"))
            .bind(&new.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        drop(conn);
        self.changes
            .send(Subject::Resource(new.id.clone()), ChangeKind::Resource);
        resource_from_row(&row)
    }

    async fn update_resource(
        &self,
        claim: Option<&Claim>,
        id: &str,
        update: &ResourceUpdate,
    ) -> Result<Resource> {
        let mut conn = self.writer.lock().await;
        let mut tx = write_tx(&mut conn).await?;
        if let Some(claim) = claim
            && !holds(&mut tx, claim).await?
        {
            drop(tx);
            drop(conn);
            return Err(self.stale(claim).await);
        }
        let row = sqlx::query(concat!(
            "UPDATE resources SET state = COALESCE(?2, state), external_id = COALESCE(?3, external_id),
                expires_at = COALESCE(?4, expires_at), updated_at = ?5
             WHERE id = ?1 RETURNING ",
            resource_columns!()
        ))
        .bind(id)
        .bind(update.state.map(ResourceState::as_str))
        .bind(update.external_id.as_deref())
        .bind(update.expires_at.map(millis))
        .bind(millis(Utc::now()))
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?
        .ok_or_else(|| StoreError::ResourceNotFound(id.to_string()))?;
        tx.commit().await.map_err(backend)?;
        drop(conn);
        self.changes
            .send(Subject::Resource(id.to_string()), ChangeKind::Resource);
        resource_from_row(&row)
    }

    async fn resources(&self, query: &ResourceQuery) -> Result<Vec<Resource>> {
        let states: Vec<&str> = query.states.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(select_resources!(
            "WHERE (?1 IS NULL OR run_id = ?1) AND (?2 IS NULL OR service = ?2)
               AND (?3 IS NULL OR engine = ?3)
               AND (?4 = '[]' OR state IN (SELECT value FROM json_each(?4)))
             ORDER BY created_at DESC, id"
        ))
        .bind(query.run.as_ref().map(RunId::as_str))
        .bind(query.service.as_deref())
        .bind(query.engine.as_deref())
        .bind(serde_json::to_string(&states).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        rows.iter().map(resource_from_row).collect()
    }

    /// Taken at once and written after the caller goes on (a webhook's answer does not wait
    /// for its log entry's commit, which would queue behind the writes of the run it started):
    /// every read of the log, and `close`, first writes what is waiting.
    async fn record_delivery(&self, delivery: &Delivery) -> Result<()> {
        self.pending_deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(delivery.clone());
        let store = self.clone();
        tokio::spawn(async move {
            // Another flush took it already (under a burst, one for many).
            if store
                .pending_deliveries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                return;
            }
            if let Err(e) = store.flush_deliveries().await {
                tracing::warn!(error = %e, "logging webhook deliveries failed");
            }
        });
        Ok(())
    }

    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>> {
        self.flush_deliveries().await?;
        let limit = match query.limit {
            0 => super::DEFAULT_PAGE,
            n => n.min(super::MAX_PAGE),
        };
        let rows = sqlx::query(select_deliveries!(
            "WHERE (?1 IS NULL OR hook = ?1) AND (?2 IS NULL OR id = ?2)
             ORDER BY received_at DESC, key DESC LIMIT ?3"
        ))
        .bind(query.hook.as_deref())
        .bind(query.id.as_deref())
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn delivery(&self, key: &str) -> Result<Option<Delivery>> {
        self.flush_deliveries().await?;
        let row = sqlx::query(select_deliveries!("WHERE key = ?1"))
            .bind(key)
            .fetch_optional(&self.readers)
            .await
            .map_err(backend)?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    async fn prune_deliveries(&self, before: DateTime<Utc>) -> Result<u64> {
        self.flush_deliveries().await?;
        let done = sqlx::query("DELETE FROM webhook_deliveries WHERE received_at < ?1")
            .bind(millis(before))
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn schedule_mark(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        let mark: Option<i64> = sqlx::query("SELECT last_slot FROM schedules WHERE key = ?1")
            .bind(key)
            .fetch_optional(&self.readers)
            .await
            .map_err(backend)?
            .map(|row| row.get(0));
        Ok(from_millis(mark))
    }

    async fn advance_schedule(
        &self,
        key: &str,
        expected: Option<DateTime<Utc>>,
        slot: DateTime<Utc>,
    ) -> Result<bool> {
        // One statement: it moves the mark only from the value the caller saw.
        let done = match expected {
            None => sqlx::query(
                "INSERT INTO schedules (key, last_slot) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(millis(slot)),
            Some(seen) => sqlx::query(
                "UPDATE schedules SET last_slot = ?2 WHERE key = ?1 AND last_slot = ?3",
            )
            .bind(key)
            .bind(millis(slot))
            .bind(millis(seen)),
        }
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn status_counts(&self) -> Result<Vec<(RunStatus, u64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) FROM runs GROUP BY status")
            .fetch_all(&self.readers)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let status: String = r.get(0);
                let n: i64 = r.get(1);
                Ok((status.parse().map_err(corrupt("run status"))?, n as u64))
            })
            .collect()
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.sender.subscribe()
    }
}
