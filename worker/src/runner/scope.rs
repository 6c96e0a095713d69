//! What expressions see during a run: params typed as declared, env, secrets, steps' statuses
//! and outputs, run fields.

use super::*;

pub(super) struct StepState {
    pub(super) status: StepStatus,
    pub(super) outputs: BTreeMap<String, String>,
}

/// What expressions see during a run.
pub(super) struct RunScope<'a> {
    pub(super) run: &'a Run,
    pub(super) pipeline: &'a Pipeline,
    pub(super) env: &'a [(String, String)],
    pub(super) secrets: &'a Secrets,
    pub(super) steps: &'a HashMap<String, StepState>,
    pub(super) failed: bool,
    pub(super) cancelled: bool,
    pub(super) run_status: &'a str,
}

impl Scope for RunScope<'_> {
    fn lookup(&self, path: &[String]) -> Result<Value, EvalError> {
        let s = |v: &str| Value::String(v.to_string());
        let name = path.get(1).map(String::as_str).unwrap_or("");
        Ok(match path[0].as_str() {
            // Typed by the pipeline's declaration: `false` is false, numbers compare as numbers.
            "params" => {
                let given = self.run.params.get(name).map(String::as_str);
                match self.pipeline.param(name) {
                    Some(p) => p.typed(given),
                    None => given.map_or(Value::Null, s),
                }
            }
            "env" => self
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map_or(Value::Null, |(_, v)| s(v)),
            "secrets" => match self.secrets.get(name) {
                Some(v) => s(v),
                None => {
                    return Err(EvalError(format!(
                        "secret `{name}` is not provided (set SKIFF_SECRET_{name} or add it to the secrets file)"
                    )));
                }
            },
            "steps" => match (self.steps.get(name), path.get(2).map(String::as_str)) {
                (Some(st), Some("status")) => s(st.status.as_str()),
                (Some(st), Some("outputs")) => path
                    .get(3)
                    .and_then(|o| st.outputs.get(o))
                    .map_or(Value::Null, |v| s(v)),
                (None, Some("status")) => s(StepStatus::Pending.as_str()),
                _ => Value::Null,
            },
            "run" => match name {
                "id" => s(self.run.id.as_str()),
                "number" => Value::Number(self.run.number as f64),
                "pipeline" => s(&self.run.pipeline),
                "status" => s(self.run_status),
                "trigger" => s(self.run.trigger.kind.as_str()),
                _ => Value::Null,
            },
            _ => Value::Null,
        })
    }

    fn failed(&self) -> bool {
        self.failed
    }

    fn cancelled(&self) -> bool {
        self.cancelled
    }
}
