//! Records as Redis holds them, and back: hashes of text fields, times in milliseconds, and
//! the JSON of step plans and states. Nothing read from Redis is trusted: a field that does not
//! parse is [`StoreError::Corrupt`], never a panic.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use redis::Value;
use skiff_core::ledger::Resource;
use skiff_core::run::{Phase, Run, RunId, RunStatus, StepRecord, StepStatus, Trigger};
use skiff_core::store::{Claim, StoreError};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A Redis failure, said plainly: away (no answer in time, or no connection) or refused. A
/// value that is not what skiff wrote (a key of another type, a reply of the wrong shape) is
/// corrupt data, not a failure of Redis.
pub fn backend(e: redis::RedisError) -> StoreError {
    let wrong_type = e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE");
    if wrong_type
        || matches!(
            e.kind(),
            redis::ErrorKind::UnexpectedReturnType | redis::ErrorKind::Parse
        )
    {
        return StoreError::Corrupt(format!("redis: {e}"));
    }
    StoreError::Backend(if e.is_timeout() {
        format!("redis: no answer in time ({e}): is Redis up and reachable?")
    } else if e.is_connection_refusal() || e.is_connection_dropped() {
        format!("redis: not connected ({e}): is Redis up and reachable?")
    } else {
        format!("redis: {e}")
    })
}

pub fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// The bytes of a reply that should be a string.
pub fn bytes(value: Value) -> Result<Vec<u8>> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Okay => Ok(b"OK".to_vec()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        other => Err(corrupt(format!("a string was expected, not {other:?}"))),
    }
}

pub fn text(value: Value) -> Result<String> {
    String::from_utf8(bytes(value)?).map_err(|_| corrupt("a reply is not UTF-8"))
}

/// A script's answer: its code (`ok`, `notfound`, `stale`...) and what follows it.
pub fn reply(value: Value) -> Result<(String, Vec<Value>)> {
    let Value::Array(mut items) = value else {
        return Err(corrupt(format!("a script answered {value:?}")));
    };
    if items.is_empty() {
        return Err(corrupt("a script answered nothing"));
    }
    let rest = items.split_off(1);
    let code = items.pop().map(text).transpose()?.unwrap_or_default();
    Ok((code, rest))
}

/// A hash's fields, as HGETALL gives them.
#[derive(Debug, Default)]
pub struct Fields(HashMap<String, Vec<u8>>);

impl Fields {
    pub fn from_value(value: Value) -> Result<Self> {
        let mut map = HashMap::new();
        match value {
            Value::Array(items) => {
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    map.insert(text(k)?, bytes(v)?);
                }
            }
            Value::Map(pairs) => {
                for (k, v) in pairs {
                    map.insert(text(k)?, bytes(v)?);
                }
            }
            Value::Nil => {}
            other => return Err(corrupt(format!("a hash was expected, not {other:?}"))),
        }
        Ok(Fields(map))
    }

    pub fn from_map(map: HashMap<String, Vec<u8>>) -> Self {
        Fields(map)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }

    pub fn take_raw(&mut self, name: &str) -> Option<Vec<u8>> {
        self.0.remove(name)
    }

    pub fn opt_text(&self, name: &str) -> Result<Option<String>> {
        self.0
            .get(name)
            .map(|b| {
                String::from_utf8(b.clone()).map_err(|_| corrupt(format!("`{name}` is not UTF-8")))
            })
            .transpose()
    }

    pub fn text(&self, name: &str) -> Result<String> {
        self.opt_text(name)?
            .ok_or_else(|| corrupt(format!("the record has no `{name}`")))
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        self.opt_text(name)?
            .map(|t| {
                t.parse::<i64>()
                    .map_err(|_| corrupt(format!("`{name}` is not a number: `{t}`")))
            })
            .transpose()
    }

    pub fn int(&self, name: &str) -> Result<i64> {
        self.opt_int(name)?
            .ok_or_else(|| corrupt(format!("the record has no `{name}`")))
    }

    pub fn opt_time(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        self.opt_int(name)?
            .map(|ms| from_millis(ms).ok_or_else(|| corrupt(format!("`{name}` is not a time"))))
            .transpose()
    }

    pub fn time(&self, name: &str) -> Result<DateTime<Utc>> {
        self.opt_time(name)?
            .ok_or_else(|| corrupt(format!("the record has no `{name}`")))
    }

    /// Checks the record's schema version: one this skiff knows.
    pub fn version(&self, what: &str) -> Result<()> {
        match self.opt_int("v")? {
            Some(1) => Ok(()),
            Some(v) => Err(corrupt(format!(
                "{what} has schema version {v}, which this skiff does not know"
            ))),
            None => Err(corrupt(format!("{what} has no schema version"))),
        }
    }
}

fn parse<T: FromStr<Err = String>>(what: &str, text: &str) -> Result<T> {
    text.parse()
        .map_err(|e: String| corrupt(format!("{what}: {e}")))
}

pub fn run_from(f: &Fields) -> Result<Run> {
    f.version("a run")?;
    let params = f.text("params")?;
    Ok(Run {
        id: parse("run id", &f.text("id")?)?,
        pipeline: f.text("pipeline")?,
        number: u64::try_from(f.int("number")?).map_err(|_| corrupt("a run's number"))?,
        status: parse("run status", &f.text("status")?)?,
        trigger: Trigger {
            kind: parse("trigger", &f.text("trigger_kind")?)?,
            actor: f.text("trigger_actor")?,
        },
        params: serde_json::from_str(&params).map_err(|e| corrupt(format!("params: {e}")))?,
        source: f.text("source")?,
        rerun_of: f
            .opt_text("rerun_of")?
            .map(|r| parse::<RunId>("rerun_of", &r))
            .transpose()?,
        created_at: f.time("created_at")?,
        started_at: f.opt_time("started_at")?,
        finished_at: f.opt_time("finished_at")?,
        reason: f.opt_text("reason")?,
        log_len: u64::try_from(f.opt_int("log_len")?.unwrap_or(0))
            .map_err(|_| corrupt("a run's log length"))?,
        cancel_requested: f.opt_text("cancel_requested")?.as_deref() == Some("1"),
        cancel_reason: f.opt_text("cancel_reason")?,
        claimed_by: f.opt_text("claimed_by")?,
        lease_until: f.opt_time("lease_until")?,
        idempotency_key: f.opt_text("idempotency_key")?,
        group: f.opt_text("group")?,
        held: f.opt_text("held")?.as_deref() == Some("1"),
    })
}

/// A claimed run and its claim.
pub fn claim_from(f: &Fields) -> Result<(Run, Claim)> {
    let run = run_from(f)?;
    let claim = Claim {
        run: run.id.clone(),
        worker: run.claimed_by.clone().unwrap_or_default(),
        token: u64::try_from(f.int("claim_token")?).map_err(|_| corrupt("a claim token"))?,
        expires_at: run
            .lease_until
            .ok_or_else(|| corrupt("a claimed run has no lease"))?,
    };
    Ok((run, claim))
}

/// A step as planned (`p:{index}` in the run's steps hash).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct PlanJson {
    pub v: u32,
    pub id: String,
    pub name: String,
    pub phase: String,
}

/// A step's state (`s:{index}`), written by the run's worker.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StateJson {
    pub v: u32,
    pub status: String,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub started_at: Option<i64>,
    #[serde(default)]
    pub finished_at: Option<i64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default, deserialize_with = "outputs")]
    pub outputs: BTreeMap<String, String>,
}

/// Outputs: an object of strings (Lua's JSON writes an empty one as `{}`, or as `[]` when it
/// cannot tell, so an empty list is read as no outputs too).
fn outputs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        Map(BTreeMap<String, String>),
        List(Vec<serde_json::Value>),
    }
    match Either::deserialize(d)? {
        Either::Map(m) => Ok(m),
        Either::List(l) if l.is_empty() => Ok(BTreeMap::new()),
        Either::List(_) => Err(serde::de::Error::custom("outputs are a list")),
    }
}

use serde::Deserialize;

pub fn state_json(step: &StepRecord) -> String {
    let state = StateJson {
        v: 1,
        status: step.status.as_str().to_string(),
        attempt: step.attempt,
        exit_code: step.exit_code,
        started_at: step.started_at.map(millis),
        finished_at: step.finished_at.map(millis),
        reason: step.reason.clone(),
        outputs: step.outputs.clone(),
    };
    // Plain data: strings and numbers always serialize.
    serde_json::to_string(&state).unwrap_or_default()
}

/// A run's steps, in order, from its steps hash.
pub fn steps_from(f: &Fields) -> Result<Vec<StepRecord>> {
    let mut steps = Vec::new();
    for (field, value) in &f.0 {
        let Some(index) = field.strip_prefix("p:") else {
            continue;
        };
        let index: u32 = index
            .parse()
            .map_err(|_| corrupt(format!("a step field `{field}`")))?;
        let plan: PlanJson = serde_json::from_slice(value)
            .map_err(|e| corrupt(format!("step {index}'s plan: {e}")))?;
        if plan.v != 1 {
            return Err(corrupt(format!(
                "step {index} has schema version {}",
                plan.v
            )));
        }
        let mut step = StepRecord {
            index,
            id: plan.id,
            name: plan.name,
            phase: if plan.phase == "finally" {
                Phase::Finally
            } else {
                Phase::Main
            },
            status: StepStatus::Pending,
            attempt: 0,
            exit_code: None,
            started_at: None,
            finished_at: None,
            reason: None,
            outputs: BTreeMap::new(),
        };
        if let Some(state) = f.raw(&format!("s:{index}")) {
            let state: StateJson = serde_json::from_slice(state)
                .map_err(|e| corrupt(format!("step {index}'s state: {e}")))?;
            if state.v != 1 {
                return Err(corrupt(format!(
                    "step {index}'s state has schema version {}",
                    state.v
                )));
            }
            step.status = parse("step status", &state.status)?;
            step.attempt = state.attempt;
            step.exit_code = state.exit_code;
            step.started_at = state.started_at.and_then(from_millis);
            step.finished_at = state.finished_at.and_then(from_millis);
            step.reason = state.reason;
            step.outputs = state.outputs;
        }
        steps.push(step);
    }
    steps.sort_by_key(|s| s.index);
    Ok(steps)
}

pub fn resource_from(f: &Fields) -> Result<Resource> {
    f.version("a resource")?;
    Ok(Resource {
        id: f.text("id")?,
        kind: f.text("kind")?,
        name: f.text("name")?,
        engine: f.opt_text("engine")?,
        service: f.opt_text("service")?,
        run: f
            .opt_text("run")?
            .map(|r| parse::<RunId>("a resource's run", &r))
            .transpose()?,
        step: f
            .opt_int("step")?
            .map(|s| u32::try_from(s).map_err(|_| corrupt("a resource's step")))
            .transpose()?,
        state: parse("resource state", &f.text("state")?)?,
        external_id: f.opt_text("external_id")?,
        created_at: f.time("created_at")?,
        updated_at: f.time("updated_at")?,
        expires_at: f.opt_time("expires_at")?,
        hourly_price: f
            .opt_text("hourly_price")?
            .map(|p| {
                p.parse::<f64>()
                    .map_err(|_| corrupt(format!("an hourly price `{p}`")))
            })
            .transpose()?,
    })
}

/// Status names of the end states and the rest, for the status indexes.
pub fn statuses() -> impl Iterator<Item = RunStatus> {
    RunStatus::ALL.iter().copied()
}
