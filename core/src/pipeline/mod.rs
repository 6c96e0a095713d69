//! The pipeline model: what a pipeline file means once it has been loaded and checked.

mod load;
mod params;

use std::time::Duration;

use crate::expr::{Expr, Template};

pub use load::{LoadOptions, load, load_with, valid_ident, valid_name};
pub use params::{ParamError, resolve_params};

/// How long a run may take when its pipeline does not say.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub description: Option<String>,
    pub on: Triggers,
    pub params: Vec<Param>,
    pub env: Vec<EnvVar>,
    pub runs_on: Vec<String>,
    pub concurrency: Option<Template>,
    pub timeout: Option<Duration>,
    pub steps: Vec<Step>,
    pub finally: Vec<Step>,
    /// How long finished runs of this pipeline are kept; unset fields leave the server's default.
    pub retention: Retention,
    /// What its steps may do beyond an isolated step's powers (granted only where the worker
    /// allows it too).
    pub permissions: Vec<Permission>,
    /// The secrets its steps and env refer to (`secrets.NAME`), sorted: a worker must hold
    /// them all to run it (the webhook's secret is the server's and is not among them).
    pub secrets: Vec<String>,
}

/// A power a pipeline asks for on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// The Docker socket: root on the host. A worker must allow it (`--allow-docker-steps`).
    Docker,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Docker => "docker",
        }
    }
}

pub use crate::retention::Retention;

impl Pipeline {
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Main steps then `finally` steps, in the order they are numbered in a run.
    pub fn all_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().chain(&self.finally)
    }

    pub fn run_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_RUN_TIMEOUT)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Triggers {
    pub manual: bool,
    pub webhook: Option<Webhook>,
    pub schedules: Vec<Schedule>,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    /// The endpoint's id (`POST /hooks/ID`): `hook:`, or the pipeline's name.
    pub hook: String,
    /// Always a `${{ secrets.NAME }}` reference: a secret is never written in the file.
    pub secret: Template,
    /// The NAME of that reference (pipelines sharing a hook must name the same one).
    pub secret_name: String,
    /// Where the secret is written (for the catalog's check across files).
    pub secret_pos: crate::diag::Pos,
    /// Normalised events: `push`, `tag`, `pull_request`, `release`.
    pub events: Vec<String>,
    /// Glob patterns (`!` in front excludes); a push or pull request must match when set.
    pub branches: Vec<String>,
    /// Glob patterns for the tag of a `tag` or `release` event.
    pub tags: Vec<String>,
    /// Glob patterns for the files a push changed.
    pub paths: Vec<String>,
    /// `if:` over `event`.
    pub condition: Option<Condition>,
    /// Params from the event: each a template over `event`.
    pub params: Vec<(String, Template)>,
}

/// The events a webhook filter can name.
pub const WEBHOOK_EVENTS: &[&str] = &["push", "tag", "pull_request", "release"];

/// What `event.NAME` can name in `on.webhook.params` and `on.webhook.if` (`payload` goes on:
/// `event.payload.repository.name`).
pub const EVENT_FIELDS: &[&str] = &[
    "ref",
    "branch",
    "base",
    "tag",
    "sha",
    "before",
    "repo",
    "provider",
    "event",
    "raw_event",
    "action",
    "number",
    "sender",
    "delivery",
    "payload",
];

/// One `on.schedule` entry.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The line as written.
    pub cron: String,
    /// The line, parsed (5 fields, 6 with seconds first, or a nickname such as `@daily`).
    pub line: croner::Cron,
    /// Where the line's wall clock is (UTC when not given).
    pub timezone: Option<chrono_tz::Tz>,
    /// What happens to the slots missed while skiff was not running.
    pub missed: Missed,
    pub params: Vec<(String, String)>,
}

/// `missed:` of a schedule: what becomes of the slots that passed while no server ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missed {
    /// They are gone (the default): the next run is the next slot.
    #[default]
    Skip,
    /// One run, for the most recent missed slot.
    Once,
}

impl Missed {
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::Once => "once",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    String,
    Boolean,
    Number,
    Choice,
}

impl ParamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::String => "string",
            ParamKind::Boolean => "boolean",
            ParamKind::Number => "number",
            ParamKind::Choice => "choice",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    pub description: Option<String>,
    pub default: Option<String>,
    pub options: Vec<String>,
    pub required: bool,
}

#[derive(Debug, Clone)]
pub struct EnvVar {
    pub name: String,
    pub value: Template,
}

/// Defined with the run records (a step record has a phase), so that `run` does not depend on
/// `pipeline`.
pub use crate::run::Phase;

#[derive(Debug, Clone)]
pub struct Step {
    /// The id given in the file, or `step-N` / `finally-N` (1-based) when none was.
    pub id: String,
    pub name: String,
    pub phase: Phase,
    /// The `if:`; `None` means the default (`success()` for main steps, always for `finally`).
    pub condition: Option<Condition>,
    pub env: Vec<EnvVar>,
    pub timeout: Option<Duration>,
    pub retry: Retry,
    pub continue_on_error: bool,
    /// A literal relative path inside the run's workspace (checked at load: no `..`, not
    /// absolute, no expression).
    pub working_directory: Option<String>,
    pub action: StepAction,
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub expr: Expr,
    /// The expression as written, for display.
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retry {
    /// Extra attempts after the first one fails.
    pub count: u32,
    /// The pause before the first retry; each further retry waits twice as long as the last.
    pub backoff: Duration,
}

#[derive(Debug, Clone)]
pub enum StepAction {
    /// A shell script, run with `bash -eo pipefail` (or `sh -e` where bash is missing).
    Run { script: String },
    /// A built-in action and its `with` inputs.
    Uses {
        action: &'static dyn crate::actions::Spec,
        /// The `with` mapping (checked against the action's `With` when the file loaded).
        with: WithValue,
    },
}

/// A `with` value as written: a literal (typed as YAML reads it: `200` a number, `"200"` text),
/// text with `${{ }}`, a list or a mapping.
#[derive(Debug, Clone)]
pub enum WithValue {
    Lit(serde_json::Value),
    Template(Template),
    List(Vec<WithValue>),
    Map(Vec<(String, WithValue)>),
}

impl WithValue {
    /// As JSON, each template as `{EXPR_KEY: text}`: what the load-time check reads.
    pub fn to_checked_json(&self) -> serde_json::Value {
        self.to_json(&mut |_| {
            Ok::<_, std::convert::Infallible>(serde_json::json!({
                crate::actions::EXPR_KEY: "${{ }}"
            }))
        })
        .unwrap_or_else(|never| match never {})
    }

    /// As JSON, each template replaced by what `eval` makes of it.
    pub fn to_json<E>(
        &self,
        eval: &mut dyn FnMut(&Template) -> Result<serde_json::Value, E>,
    ) -> Result<serde_json::Value, E> {
        Ok(match self {
            WithValue::Lit(v) => v.clone(),
            WithValue::Template(t) => eval(t)?,
            WithValue::List(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|i| i.to_json(eval))
                    .collect::<Result<_, _>>()?,
            ),
            WithValue::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.to_json(eval)?)))
                    .collect::<Result<_, E>>()?,
            ),
        })
    }
}

/// The environment variable name under which a param, an output or a step id reaches a script:
/// upper case, anything but letters and digits turned into `_`.
pub fn env_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl Pipeline {
    /// The steps a run of this pipeline will have, numbered in order.
    pub fn plan(&self) -> Vec<crate::run::StepPlan> {
        self.all_steps()
            .enumerate()
            .map(|(i, s)| crate::run::StepPlan {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                id: s.id.clone(),
                name: s.name.clone(),
                phase: s.phase,
            })
            .collect()
    }
}
