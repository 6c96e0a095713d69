//! The built-in actions a step can `uses:`. Each takes its `with` inputs as a typed struct that
//! rejects unknown fields; `skiff_core::actions` is the catalog the loader checks against.

mod http_wait;

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};
use skiff_core::actions::{ActionSpec, FieldKind};
use skiff_core::expr::{Scope, Value};
use skiff_core::pipeline::WithValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::logs::LogSender;

/// What an action can use while it runs.
pub struct ActionContext<'a> {
    pub log: &'a LogSender,
    pub step: u32,
    pub stop: &'a CancellationToken,
    pub deadline: Option<Instant>,
}

impl ActionContext<'_> {
    pub async fn note(&self, text: &str) {
        self.log.note(Some(self.step), text).await;
    }
}

/// Evaluates a step's `with` into JSON, converting each value to its field's kind.
pub fn eval_inputs(
    spec: &ActionSpec,
    with: &[(String, WithValue)],
    scope: &dyn Scope,
) -> Result<Json, String> {
    let mut map = Map::new();
    for (name, value) in with {
        let kind = spec.field(name).map_or(FieldKind::String, |f| f.kind);
        let json = match value {
            WithValue::List(items) => Json::Array(
                items
                    .iter()
                    .map(|t| {
                        t.eval_string(scope)
                            .map(Json::String)
                            .map_err(|e| format!("with.{name}: {e}"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            WithValue::Scalar(t) => {
                let v = t.eval(scope).map_err(|e| format!("with.{name}: {e}"))?;
                convert(&v, kind).map_err(|e| format!("with.{name}: {e}"))?
            }
        };
        map.insert(name.clone(), json);
    }
    Ok(Json::Object(map))
}

fn convert(v: &Value, kind: FieldKind) -> Result<Json, String> {
    let text = v.to_string();
    match kind {
        FieldKind::String | FieldKind::StringList => Ok(Json::String(text)),
        FieldKind::Int => text
            .trim()
            .parse::<i64>()
            .map(Json::from)
            .map_err(|_| format!("expected a whole number, got `{text}`")),
        FieldKind::Bool => match (v, text.as_str()) {
            (Value::Bool(b), _) => Ok(Json::Bool(*b)),
            (_, "true") => Ok(Json::Bool(true)),
            (_, "false") => Ok(Json::Bool(false)),
            _ => Err(format!("expected true or false, got `{text}`")),
        },
        FieldKind::Duration => skiff_core::duration::parse(&text).map(|_| Json::String(text)),
    }
}

/// Deserializes inputs into an action's typed struct.
fn inputs<T: serde::de::DeserializeOwned>(json: Json) -> Result<T, String> {
    serde_json::from_value(json).map_err(|e| format!("bad inputs: {e}"))
}

/// Runs the named action; `Ok` holds its outputs, `Err` why it failed.
pub async fn run(
    name: &str,
    json: Json,
    cx: &ActionContext<'_>,
) -> Result<BTreeMap<String, String>, String> {
    match name {
        "http/wait" => http_wait::run(inputs(json)?, cx).await,
        other => Err(format!("action `{other}` is not available on this worker")),
    }
}

/// A duration written as text (`30s`), as `with` fields carry them.
#[derive(Debug, Clone, Copy)]
pub struct DurationText(pub std::time::Duration);

impl<'de> serde::Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        skiff_core::duration::parse(&text)
            .map(DurationText)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every action in the catalog is implemented, and its struct accepts every catalog field
    /// (and rejects one that is not there).
    #[test]
    fn catalog_and_structs_agree() {
        for spec in skiff_core::actions::ACTIONS {
            let mut full = Map::new();
            for f in spec.fields {
                let v = match f.kind {
                    FieldKind::String => Json::String("http://127.0.0.1:1/".into()),
                    FieldKind::Int => Json::from(200),
                    FieldKind::Bool => Json::Bool(true),
                    FieldKind::Duration => Json::String("1s".into()),
                    FieldKind::StringList => Json::Array(vec![]),
                };
                full.insert(f.name.to_string(), v);
            }
            let check = |json: Json| -> Result<(), String> {
                match spec.name {
                    "http/wait" => inputs::<http_wait::Inputs>(json).map(|_| ()),
                    other => panic!("catalog action `{other}` has no implementation"),
                }
            };
            check(Json::Object(full.clone())).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            full.insert("no_such_field".into(), Json::Null);
            assert!(
                check(Json::Object(full)).is_err(),
                "{} accepts unknown fields",
                spec.name
            );
        }
    }
}
