//! The Store: where runs, steps, outputs and logs live. One trait, a backend per deployment
//! (SQLite embedded; Redis distributed), one conformance suite that every backend passes.

pub mod auth;
mod conformance;
mod group_commit;
mod sqlite;
mod sqlite_auth;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::ledger::{NewResource, Resource, ResourceQuery, ResourceUpdate};
use crate::run::{LogChunk, NewRun, Run, RunId, RunStatus, StepRecord, StoredChunk};

pub use auth::{ApiToken, AuthStore, Scope, Session};
pub use conformance::conformance;
pub use sqlite::{SqliteStore, Writer};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("run {0} not found")]
    NotFound(RunId),
    #[error("run {id} cannot move from {from} to {to}")]
    InvalidTransition {
        id: RunId,
        from: RunStatus,
        to: RunStatus,
    },
    #[error("offset {offset} is past the end of the log ({len} bytes)")]
    OffsetOutOfRange { offset: u64, len: u64 },
    #[error("bad cursor `{0}`")]
    BadCursor(String),
    /// A write carried a claim that is no longer the run's: another worker took the run over,
    /// or the run ended. The writer must stop.
    #[error("run {id}: claim {token} is no longer the run's (it was taken over, or the run ended)")]
    StaleClaim { id: RunId, token: u64 },
    /// The run is held by a live claim (its lease has not run out).
    #[error("run {id} is held by worker {worker} until {until}")]
    Held {
        id: RunId,
        worker: String,
        until: chrono::DateTime<chrono::Utc>,
    },
    #[error("no resource `{0}` in the ledger")]
    ResourceNotFound(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store backend: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A run was created, or its state changed.
    Status,
    Step,
    Log,
    /// A cancel was requested.
    Cancel,
    /// A run was deleted (retention).
    Deleted,
    /// A resource in the ledger was recorded or changed.
    Resource,
}

/// What a change is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Run(RunId),
    /// A resource, by its ledger id.
    Resource(String),
}

/// One entry of the change feed: every run, step, log and resource change, in the order the
/// Store made them (`seq` grows by one each time, per Store process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub subject: Subject,
    pub kind: ChangeKind,
}

impl Change {
    /// The run the change is about, if it is about one.
    pub fn run(&self) -> Option<&RunId> {
        match &self.subject {
            Subject::Run(id) => Some(id),
            Subject::Resource(_) => None,
        }
    }
}

/// A filter and page over runs, newest first.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub pipeline: Option<String>,
    pub status: Option<RunStatus>,
    /// At most this many (1..=500; 0 means the default of 50).
    pub limit: u32,
    /// From a previous page's `next`.
    pub cursor: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// The cursor of the next (older) page, when there is one.
    pub next: Option<String>,
}

/// A slice of a run's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    /// The chunks from the requested offset on; the first may start inside a stored chunk.
    pub chunks: Vec<StoredChunk>,
    /// Where the next read continues.
    pub next_offset: u64,
    /// The log's length when read.
    pub len: u64,
}

/// Which finished runs of one pipeline retention deletes: those that ended before
/// `finished_before`, and those beyond the newest `keep_last`. Queued and running runs are never
/// deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    pub pipeline: String,
    pub finished_before: Option<chrono::DateTime<chrono::Utc>>,
    pub keep_last: Option<u32>,
}

/// A worker's hold on a run it executes: who holds it, until when (the lease, renewed while the
/// run goes on), and the fencing token that every write of the run carries. Each claim of a run
/// gets a higher token than the one before, so once a run is taken over, the writes of its
/// former worker are refused ([`StoreError::StaleClaim`]) and it can change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub run: RunId,
    pub worker: String,
    pub token: u64,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Which running runs [`Store::take_over_run`] may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    /// Only a run whose lease has run out (its worker is presumed dead).
    Expired,
    /// Whatever holds it (the caller knows its worker is gone: the embedded server, at start,
    /// for runs its own previous process held).
    Any,
}

/// The result of [`Store::create_run`]: the run, and whether this call created it (false when
/// a run with the same idempotency key existed already).
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub run: Run,
    pub created: bool,
    /// Whether the run's job was written with it, in its transaction (a Store that carries the
    /// queue's jobs: the embedded one once its queue is open); otherwise the Dispatcher pushes it.
    pub queued: bool,
}

/// What came of a webhook delivery, or of it for one pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryOutcome {
    /// A run was started (or found: a delivery seen before starts nothing new).
    Started,
    /// It was verified but did not match (the event, a branch, the paths, the `if:`).
    Skipped,
    /// It was verified and matched, but no run could be made (params that do not fit, the
    /// Store or the queue away).
    Failed,
    /// It was refused: a bad or missing signature, an unknown hook, a malformed body.
    Refused,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Started => "started",
            DeliveryOutcome::Skipped => "skipped",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::Refused => "refused",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Started, Self::Skipped, Self::Failed, Self::Refused]
            .into_iter()
            .find(|o| o.as_str() == text)
    }
}

/// What one delivery did for one pipeline that names its hook.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryResult {
    pub pipeline: String,
    pub outcome: DeliveryOutcome,
    /// Why it was skipped or failed; for a repeat, that the run was made before.
    pub reason: Option<String>,
    /// The run it started (or found, for a delivery id seen before).
    pub run: Option<String>,
}

/// skiff's own Redeliver: who asked, and which logged delivery was sent again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Redelivery {
    /// The [`Delivery::key`] of the delivery sent again.
    pub of: String,
    pub by: String,
    /// 1 for the first redelivery of that delivery id, then 2...
    pub count: u32,
}

/// A webhook delivery as received, and what came of it: one entry of the deliveries log.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The log entry's own id (a UUIDv7): a provider's Redeliver sends the same delivery id
    /// again, and each arrival is logged.
    pub key: String,
    /// The hook it came to.
    pub hook: String,
    /// The provider's delivery id (`X-GitHub-Delivery`...), or one skiff made up.
    pub id: String,
    /// `github`, `gitea`, `gitlab` or `generic`.
    pub provider: String,
    /// The normalised event (`push`, `tag`, `pull_request`, `release`, `ping`), or the raw
    /// name of one skiff does not handle.
    pub event: String,
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// Whether its signature (or token) checked out.
    pub verified: bool,
    pub outcome: DeliveryOutcome,
    /// Why it was refused, or a summary of why it was skipped.
    pub reason: Option<String>,
    /// One per pipeline that names the hook.
    pub results: Vec<DeliveryResult>,
    /// The request's headers, secrets masked.
    pub headers: Vec<(String, String)>,
    /// The body as received, cut to [`DELIVERY_BODY_KEPT`] bytes unless kept whole (see
    /// `body_len`).
    pub body: Vec<u8>,
    /// The body's length as received.
    pub body_len: u64,
    pub redelivery: Option<Redelivery>,
}

/// How much of a delivery's body the log keeps, unless it is kept whole (a verified delivery
/// that started nothing, so that it can be sent again).
pub const DELIVERY_BODY_KEPT: usize = 64 << 10;

impl Delivery {
    /// The runs it started (or found).
    pub fn runs(&self) -> impl Iterator<Item = &str> {
        self.results.iter().filter_map(|r| r.run.as_deref())
    }

    /// Whether the log holds the whole body.
    pub fn body_whole(&self) -> bool {
        self.body.len() as u64 == self.body_len
    }
}

/// A filter over the deliveries log, newest first.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub hook: Option<String>,
    /// The provider's delivery id.
    pub id: Option<String>,
    /// At most this many (1..=500; 0 means the default of 50).
    pub limit: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a run in `queued` with its steps `pending`, numbered next for its pipeline. With
    /// an idempotency key that the pipeline has seen before, creates nothing and answers the
    /// run that key created.
    async fn create_run(&self, new: NewRun) -> Result<Created>;
    async fn get_run(&self, id: &RunId) -> Result<Option<Run>>;
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage>;
    /// The run's steps, in order.
    async fn steps(&self, id: &RunId) -> Result<Vec<StepRecord>>;
    /// Claims a queued run for `worker` (queued -> running) with a lease of `lease`; of many
    /// claims at once exactly one wins, the others get `InvalidTransition`. A run cancelled
    /// while queued cannot be claimed.
    async fn claim_run(
        &self,
        id: &RunId,
        worker: &str,
        lease: std::time::Duration,
    ) -> Result<(Run, Claim)>;
    /// Claims a running run whose worker is gone (see [`TakeOver`]), with a new fencing token:
    /// the old worker's writes are refused from now on. `Held` when the lease still runs and
    /// `when` is `Expired`.
    async fn take_over_run(
        &self,
        id: &RunId,
        worker: &str,
        lease: std::time::Duration,
        when: TakeOver,
    ) -> Result<(Run, Claim)>;
    /// Gives a claimed run back to the queue (running -> queued, its claim dead: the token
    /// moves on) if none of its steps has started: a run its worker took but never began
    /// (the worker died, or stopped) runs once, elsewhere. `InvalidTransition` (from running)
    /// once a step started; `StaleClaim` when the claim is no longer the run's.
    async fn release_run(&self, claim: &Claim) -> Result<Run>;
    /// Extends a claim's lease; `StaleClaim` when the claim is no longer the run's.
    async fn renew_claim(&self, claim: &Claim, lease: std::time::Duration) -> Result<Claim>;
    /// Writes a step's state, attempt, times, exit code, reason and outputs.
    async fn update_step(&self, claim: &Claim, step: &StepRecord) -> Result<()>;
    /// Appends chunks to the run's log in one write; returns the log's new length.
    async fn append_logs(&self, claim: &Claim, chunks: &[LogChunk]) -> Result<u64>;
    /// Ends the run (running -> an end state) with its reason, stamping its end time, and
    /// releases the claim. `steps` are step records (as [`Store::update_step`] writes them)
    /// written with the end, atomically: all of it or, with a stale claim or a refused move,
    /// none of it (the runner's last step ends as its run does: one write, not two). Returns the
    /// run as it now is.
    async fn finish_run(
        &self,
        claim: &Claim,
        steps: &[StepRecord],
        status: RunStatus,
        reason: Option<&str>,
    ) -> Result<Run>;
    /// Reads from `offset`, about `max_bytes` at most (always at least one chunk if any).
    async fn read_logs(&self, id: &RunId, offset: u64, max_bytes: usize) -> Result<LogRead>;
    /// Asks for a run to be cancelled: a queued run is cancelled at once; a running one is
    /// marked so that its worker stops it (and runs its `finally`). An ended run is left as it
    /// is. Returns the run as it now is.
    async fn request_cancel(&self, id: &RunId, reason: &str) -> Result<Run>;
    /// Deletes the runs `prune` selects, with their steps, outputs and logs; returns their ids.
    /// A pipeline's run numbers are never given again after its runs are deleted.
    async fn prune_runs(&self, prune: &Prune) -> Result<Vec<RunId>>;
    /// The names of the pipelines that have runs in the Store (including pipelines whose file
    /// is gone).
    async fn pipelines_with_runs(&self) -> Result<Vec<String>>;
    /// Records a resource before it is created (`creating`); recording an id again answers
    /// the first record. From a run, `claim` is its claim (refused when stale).
    async fn record_resource(&self, claim: Option<&Claim>, new: NewResource) -> Result<Resource>;
    /// Changes a recorded resource (its state, the engine's id, its expiry).
    async fn update_resource(
        &self,
        claim: Option<&Claim>,
        id: &str,
        update: &ResourceUpdate,
    ) -> Result<Resource>;
    /// Recorded resources, newest first.
    async fn resources(&self, query: &ResourceQuery) -> Result<Vec<Resource>>;
    /// Adds an entry to the deliveries log (by its `key`: recording a key again changes
    /// nothing). It is in the log for every read that starts after this returns; a backend may
    /// commit it later (SQLite does, with the others waiting, so a webhook's answer does not
    /// wait for it), and loses it only if the process dies first.
    async fn record_delivery(&self, delivery: &Delivery) -> Result<()>;
    /// Deliveries, newest first.
    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>>;
    /// One delivery, by its log key.
    async fn delivery(&self, key: &str) -> Result<Option<Delivery>>;
    /// Deletes the deliveries received before `before`; returns how many.
    async fn prune_deliveries(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64>;
    /// The last slot a schedule fired for (`key` names the schedule).
    async fn schedule_mark(&self, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>>;
    /// Moves a schedule's mark from `expected` to `slot`, if it is still `expected`: of several
    /// servers firing the same slot, exactly one gets true.
    async fn advance_schedule(
        &self,
        key: &str,
        expected: Option<chrono::DateTime<chrono::Utc>>,
        slot: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool>;
    /// How many runs are in each state (states with none are left out).
    async fn status_counts(&self) -> Result<Vec<(RunStatus, u64)>>;
    /// Runs as they change (state, steps, log, cancel requests). A receiver that falls behind
    /// misses changes and should re-read what it follows.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
}

/// Every run in `status`, oldest first (page after page).
pub async fn runs_in(store: &dyn Store, status: RunStatus) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_runs(&RunQuery {
                status: Some(status),
                limit: MAX_PAGE,
                cursor,
                ..RunQuery::default()
            })
            .await?;
        runs.extend(page.runs);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    runs.reverse();
    Ok(runs)
}

pub(crate) fn params_to_json(params: &BTreeMap<String, String>) -> String {
    serde_json::to_string(params).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn params_from_json(text: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("params: {e}")))
}

pub(crate) const DEFAULT_PAGE: u32 = 50;
pub(crate) const MAX_PAGE: u32 = 500;
