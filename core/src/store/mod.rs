//! The Store: where runs, steps, outputs and logs live. One trait, a backend per deployment
//! (SQLite embedded; Redis distributed), one conformance suite that every backend passes.

pub mod auth;
mod conformance;
mod sqlite;
mod sqlite_auth;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::run::{LogChunk, NewRun, Run, RunId, RunStatus, StepRecord, StoredChunk};

pub use auth::{ApiToken, AuthStore, Session};
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
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store backend: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What changed about a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Status,
    Step,
    Log,
    /// A cancel was requested.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub run: RunId,
    pub kind: ChangeKind,
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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a run in `queued` with its steps `pending`, numbered next for its pipeline.
    async fn create_run(&self, new: NewRun) -> Result<Run>;
    async fn get_run(&self, id: &RunId) -> Result<Option<Run>>;
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage>;
    /// The run's steps, in order.
    async fn steps(&self, id: &RunId) -> Result<Vec<StepRecord>>;
    /// Moves a run to `status` if the move is legal, stamping started/finished times. Returns
    /// the run as it now is.
    async fn set_status(&self, id: &RunId, status: RunStatus, reason: Option<&str>) -> Result<Run>;
    /// Writes a step's state, attempt, times, exit code, reason and outputs.
    async fn update_step(&self, id: &RunId, step: &StepRecord) -> Result<()>;
    /// Appends chunks to the run's log in one write; returns the log's new length.
    async fn append_logs(&self, id: &RunId, chunks: &[LogChunk]) -> Result<u64>;
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
    /// How many runs are in each state (states with none are left out).
    async fn status_counts(&self) -> Result<Vec<(RunStatus, u64)>>;
    /// Runs as they change (state, steps, log, cancel requests). A receiver that falls behind
    /// misses changes and should re-read what it follows.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
}

pub(crate) fn params_to_json(params: &BTreeMap<String, String>) -> String {
    serde_json::to_string(params).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn params_from_json(text: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("params: {e}")))
}

pub(crate) const DEFAULT_PAGE: u32 = 50;
pub(crate) const MAX_PAGE: u32 = 500;
