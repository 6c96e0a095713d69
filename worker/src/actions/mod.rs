//! Executing the built-in actions. Each is defined once in `skiff_core::actions` (its name, its
//! `with` struct, its outputs); the worker adds the execution ([`Execute`]) and nothing else.
//! The dispatch below is made from `skiff_core::for_each_action!`, so an action defined there
//! without an `Execute` impl here does not compile.

mod docker;
mod git;
mod http_wait;

pub use docker::{Tools, engine_targets};

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value as Json;
use skiff_core::actions::{self as defs, ActionDef};
use skiff_core::expr::{Expr, Scope, Value, walk};
use skiff_core::ledger::{NewResource, Resource, ResourceUpdate};
use skiff_core::pipeline::WithValue;
use skiff_core::run::RunId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::logs::LogSender;
use crate::record::Recorder;
use crate::secrets::Secrets;

/// Why an action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Its `with`, once evaluated, does not fit (a param that is not a URL, say). Trying again
    /// cannot help: the step is not retried.
    #[error("{0}")]
    Inputs(String),
    /// It failed; `retryable` says whether the step's `retry:` should try again (a service that
    /// did not answer yet) or not (a refusal that will not change).
    #[error("{message}")]
    Failed { message: String, retryable: bool },
    /// It stopped because it was asked to (cancel or timeout), after cleaning up.
    #[error("{0}")]
    Stopped(String),
}

impl ActionError {
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ActionError::Failed {
                retryable: true,
                ..
            }
        )
    }

    pub fn failed(message: impl Into<String>) -> Self {
        ActionError::Failed {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        ActionError::Failed {
            message: message.into(),
            retryable: false,
        }
    }
}

/// What an action can use while it runs.
pub struct ActionContext<'a> {
    pub run: &'a RunId,
    pub run_number: u64,
    pub pipeline: &'a str,
    /// The step's index in the run and its id.
    pub step: u32,
    pub step_id: &'a str,
    /// 1 for the first try.
    pub attempt: u32,
    /// Only the secrets the step's `with` names.
    pub secrets: Secrets,
    /// The run's workspace (a build context is a folder of it).
    pub workspace: &'a std::path::Path,
    /// The uid and gid the run's steps run as, when they run isolated: what an action leaves
    /// in the workspace is made theirs.
    pub owner: Option<(u32, u32)>,
    /// skiff's config and the engines the worker reaches.
    pub tools: &'a Tools,
    /// The run's log; everything sent here is masked like the steps' output.
    pub log: &'a LogSender,
    /// The run's writes, under its claim (for the resources ledger).
    pub rec: &'a Recorder,
    /// Fired on cancel and on timeout: stop what was started, record what exists, return
    /// (`ActionError::Stopped`) within `grace`; after that the action is abandoned.
    pub stop: CancellationToken,
    pub grace: Duration,
    /// When the step's time is up (the runner fires `stop` then).
    pub deadline: Option<Instant>,
}

impl ActionContext<'_> {
    /// A line in the run's log, marked as skiff's.
    pub async fn note(&self, text: &str) {
        self.log.note(Some(self.step), text).await;
    }

    /// Records a thing about to be created (an intent record: a crash mid-create leaves nothing
    /// the ledger does not know); recording the same id again answers the first record.
    pub async fn record_resource(&self, mut new: NewResource) -> Result<Resource, ActionError> {
        new.run = Some(self.run.clone());
        new.step = Some(self.step);
        self.rec
            .store()
            .record_resource(Some(self.rec.claim()), new)
            .await
            .map_err(|e| ActionError::failed(format!("recording a resource: {e}")))
    }

    /// Changes a recorded resource (it is live, its engine id, it was removed).
    pub async fn update_resource(
        &self,
        id: &str,
        update: &ResourceUpdate,
    ) -> Result<Resource, ActionError> {
        self.rec
            .store()
            .update_resource(Some(self.rec.claim()), id, update)
            .await
            .map_err(|e| ActionError::failed(format!("updating resource {id}: {e}")))
    }
}

/// The execution of one action defined in `skiff_core::actions`.
#[async_trait]
pub trait Execute: ActionDef {
    async fn execute(
        with: Self::With,
        cx: &ActionContext<'_>,
    ) -> Result<Self::Outputs, ActionError>;
}

async fn execute<A: Execute>(
    with: &Json,
    cx: &ActionContext<'_>,
) -> Result<BTreeMap<String, String>, ActionError> {
    let with: A::With = defs::decode(with)
        .map_err(|e| ActionError::Inputs(format!("`{}`: {}", e.dotted(), e.message)))?;
    let outputs = A::execute(with, cx).await?;
    defs::outputs_text(&outputs)
        .map(|o| o.into_iter().collect())
        .map_err(ActionError::refused)
}

macro_rules! dispatch {
    ($($a:ty),* $(,)?) => {
        /// Runs the named action with its evaluated `with`; its outputs as text.
        pub async fn run(
            name: &str,
            with: &Json,
            cx: &ActionContext<'_>,
        ) -> Result<BTreeMap<String, String>, ActionError> {
            $(
                if name == <$a as ActionDef>::NAME {
                    return execute::<$a>(with, cx).await;
                }
            )*
            Err(ActionError::refused(format!("action `{name}` is not available on this worker")))
        }
    };
}
skiff_core::for_each_action!(dispatch);

/// Evaluates a step's `with`: each template becomes its value (a template that is one expression
/// keeps its type: `${{ params.port }}` of a number param is a number).
pub fn eval_with(with: &WithValue, scope: &dyn Scope) -> Result<Json, ActionError> {
    with.to_json(&mut |t| {
        let v = t
            .eval(scope)
            .map_err(|e| ActionError::Inputs(format!("with: {e}")))?;
        Ok(match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            // A whole number stays whole (`8080`, not `8080.0`).
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => Json::from(n as i64),
            Value::Number(n) => serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number),
            Value::String(s) => Json::String(s),
        })
    })
}

/// The secrets a step's `with` names (`secrets.NAME`): all an action gets to see.
pub fn named_secrets(with: &WithValue, all: &Secrets) -> Secrets {
    let mut names = BTreeSet::new();
    let _ = with.to_json(&mut |t| {
        for (e, _) in t.exprs() {
            walk(e, &mut |e| {
                if let Expr::Ref { path, .. } = e
                    && path.first().map(String::as_str) == Some("secrets")
                    && let Some(name) = path.get(1)
                {
                    names.insert(name.clone());
                }
            });
        }
        Ok::<_, ()>(Json::Null)
    });
    Secrets::new(
        names
            .into_iter()
            .filter_map(|n| all.get(&n).map(|v| (n.clone(), v.to_string()))),
    )
}
