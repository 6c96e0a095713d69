//! Runs and steps: their identities, states and the legal moves between states.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// Which part of a run a step belongs to: the main steps, or the `finally` steps that always run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Main,
    Finally,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Main => "main",
            Phase::Finally => "finally",
        }
    }
}

/// A run's id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(String);

impl RunId {
    pub fn generate() -> Self {
        RunId(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RunId {
    type Err = String;

    /// Accepts only the canonical UUID text, so an id from a URL is never anything stranger.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s)
            .map(|u| RunId(u.to_string()))
            .map_err(|_| format!("`{s}` is not a run id"))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)*
                    other => Err(format!("unknown {} `{other}`", stringify!($name))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// The state of a run.
    RunStatus {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        TimedOut = "timed_out",
    }
);

string_enum!(
    /// The state of one step of a run.
    StepStatus {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Skipped = "skipped",
        Cancelled = "cancelled",
        TimedOut = "timed_out",
    }
);

string_enum!(
    /// What started a run.
    TriggerKind {
        Manual = "manual",
        Api = "api",
        Cli = "cli",
        Webhook = "webhook",
        Schedule = "schedule",
        Rerun = "rerun",
        Service = "service",
    }
);

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    /// The legal moves: queued -> running or cancelled; running -> any end state. End states
    /// are final.
    pub fn can_move_to(self, next: RunStatus) -> bool {
        match self {
            RunStatus::Queued => matches!(next, RunStatus::Running | RunStatus::Cancelled),
            RunStatus::Running => next.is_terminal(),
            _ => false,
        }
    }
}

impl StepStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, StepStatus::Pending | StepStatus::Running)
    }
}

/// Who or what started a run: the kind, and the user, hook or schedule behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub kind: TriggerKind,
    pub actor: String,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} by {}", self.kind, self.actor)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: RunId,
    pub pipeline: String,
    /// 1, 2, 3... per pipeline.
    pub number: u64,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub params: BTreeMap<String, String>,
    /// The pipeline file's text when the run was created: a rerun runs exactly this.
    pub source: String,
    pub rerun_of: Option<RunId>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the run ended as it did, for failed, cancelled and timed-out runs.
    pub reason: Option<String>,
    /// Bytes of log written so far.
    pub log_len: u64,
    /// Someone asked for this run to be cancelled; its worker stops it (or stopped nothing, when
    /// the cancel came after the main steps had ended).
    pub cancel_requested: bool,
    /// Who asked, and why: the run's reason if the cancel stopped or skipped a main step.
    pub cancel_reason: Option<String>,
    /// The worker that claimed the run (kept after the run ends: who ran it).
    pub claimed_by: Option<String>,
    /// Until when the claim holds unless renewed (while the run is running).
    pub lease_until: Option<DateTime<Utc>>,
    /// The key that makes creating this run idempotent (a webhook delivery, a schedule slot).
    pub idempotency_key: Option<String>,
    /// Its concurrency group (the pipeline's `concurrency:`, evaluated when it was made): one
    /// run of a group at a time, across every worker.
    pub group: Option<String>,
    /// Queued without a job: another run of its group was queued or running when it was made.
    /// It gets its job when the runs before it in the group have ended (`finally` included).
    pub held: bool,
}

/// A step of a run as planned when the run is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub phase: Phase,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub phase: Phase,
    pub status: StepStatus,
    /// 1 for the first attempt, 2 for the first retry...
    pub attempt: u32,
    pub exit_code: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub outputs: BTreeMap<String, String>,
}

impl StepRecord {
    pub fn planned(plan: &StepPlan) -> Self {
        StepRecord {
            index: plan.index,
            id: plan.id.clone(),
            name: plan.name.clone(),
            phase: plan.phase,
            status: StepStatus::Pending,
            attempt: 0,
            exit_code: None,
            started_at: None,
            finished_at: None,
            reason: None,
            outputs: BTreeMap::new(),
        }
    }
}

/// Everything needed to create a run.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub pipeline: String,
    pub trigger: Trigger,
    pub params: BTreeMap<String, String>,
    pub source: String,
    pub steps: Vec<StepPlan>,
    pub rerun_of: Option<RunId>,
    /// Creating a second run of the pipeline with the same key creates nothing and answers the
    /// first (a webhook delivery id, a schedule slot).
    pub idempotency_key: Option<String>,
    /// Its concurrency group, if its pipeline has one.
    pub group: Option<String>,
    /// What a worker needs to take it (`dispatch::needs`): the Redis Store keeps them for a run
    /// of a group, whose job it writes itself when the group lets it go (the embedded queue's
    /// jobs carry no labels).
    pub labels: Vec<String>,
}

string_enum!(
    /// Where log lines come from: `output` is a step's standard output and standard error in
    /// the order it wrote them (the runner reads both through one pipe to keep that order);
    /// `stdout` and `stderr` are the two apart; `skiff` is lines skiff writes about the run
    /// (`[skiff] ...`).
    LogStream {
        Output = "output",
        Stdout = "stdout",
        Stderr = "stderr",
        Skiff = "skiff",
    }
);

/// Log bytes to append: whole lines (or pieces of a very long one) of one stream, belonging to
/// a step (or to the run itself when `step` is `None`), with the time they were read. Every line
/// of a chunk has the chunk's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub step: Option<u32>,
    pub stream: LogStream,
    pub at: DateTime<Utc>,
    pub data: Vec<u8>,
}

impl LogChunk {
    /// A step's output, read now.
    pub fn output(step: Option<u32>, data: Vec<u8>) -> Self {
        LogChunk {
            step,
            stream: LogStream::Output,
            at: Utc::now(),
            data,
        }
    }

    /// A line of skiff's own, written now.
    pub fn skiff(step: Option<u32>, data: Vec<u8>) -> Self {
        LogChunk {
            step,
            stream: LogStream::Skiff,
            at: Utc::now(),
            data,
        }
    }
}

/// Log bytes as stored, at their offset in the run's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    pub offset: u64,
    pub step: Option<u32>,
    pub stream: LogStream,
    /// When its lines were read (to the millisecond).
    pub at: DateTime<Utc>,
    pub data: Vec<u8>,
}
