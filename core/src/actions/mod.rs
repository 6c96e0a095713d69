//! The built-in actions a step can `uses:`, each defined once: an [`ActionDef`] names it and
//! gives its `with` struct (plain serde data that rejects unknown fields: nested structs, lists,
//! maps, enums and checked newtypes such as [`HttpStatus`]) and its typed outputs. The loader and
//! the server check a step's `with` against that struct when the pipeline loads; the worker
//! implements the execution (its `Execute` trait, one impl per definition) and deserializes the
//! same struct from the evaluated values when the step runs.
//!
//! A `with` value that holds `${{ }}` cannot be checked before the run: it is a [`Val::Expr`] at
//! load time (the rest of the struct is still checked), and the evaluated value is checked by
//! the same code when the step runs.
//!
//! The list of actions is [`for_each_action!`]: the catalog here and the worker's dispatch are
//! both made from it, so an action without an execution does not compile.

pub mod docker;
pub mod git;
pub mod http;

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value as Json;

/// Calls `$m!(A, B, ...)` with every built-in action's definition type. Adding an action here
/// is the one registration: the catalog ([`ACTIONS`]) and the worker's dispatch follow.
#[macro_export]
macro_rules! for_each_action {
    ($m:ident) => {
        $m! {
            $crate::actions::http::Wait,
            $crate::actions::docker::Build,
            $crate::actions::docker::Push,
            $crate::actions::docker::Deploy,
            $crate::actions::docker::Stop,
            $crate::actions::docker::Start,
            $crate::actions::docker::Reap,
            $crate::actions::docker::Prune,
            $crate::actions::git::Checkout,
        }
    };
}

/// One action, defined once.
pub trait ActionDef: Send + Sync + 'static {
    /// What `uses:` names, e.g. `http/wait`.
    const NAME: &'static str;
    /// One line for people.
    const DOC: &'static str;
    /// Its `with`: `#[serde(deny_unknown_fields)]`, with [`Val`] wherever an expression may
    /// stand.
    type With: DeserializeOwned + fmt::Debug + Send + Sync;
    /// What a successful step gives `steps.ID.outputs.*`: a struct whose fields are scalars.
    type Outputs: Serialize + Default + Send;
    /// The output names (the fields of `Outputs`, checked by a test): what the loader lets
    /// `steps.ID.outputs.NAME` refer to.
    const OUTPUTS: &'static [&'static str];
}

/// The marker a templated string becomes in the JSON that is checked at load time: a one-key
/// object no evaluated value can be (an expression's value is a scalar).
pub const EXPR_KEY: &str = "${{}}";

/// A `with` value that may be written as an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<T> {
    /// A literal, or (when the step runs) the evaluated value; checked.
    Lit(T),
    /// Text with `${{ }}`, seen at load time only.
    Expr(String),
}

impl<T> Val<T> {
    /// The value when the step runs (every expression has been evaluated by then).
    pub fn get(&self) -> Result<&T, String> {
        match self {
            Val::Lit(v) => Ok(v),
            Val::Expr(text) => Err(format!("`{text}` was not evaluated")),
        }
    }
}

impl<T: Clone> Val<T> {
    /// An optional field's value when the step runs.
    pub fn opt(v: &Option<Val<T>>) -> Result<Option<T>, String> {
        v.as_ref().map(|v| v.get().cloned()).transpose()
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Val<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Json::deserialize(d)?;
        if let Json::Object(m) = &v
            && m.len() == 1
            && let Some(Json::String(text)) = m.get(EXPR_KEY)
        {
            return Ok(Val::Expr(text.clone()));
        }
        lenient::<T>(v).map(Val::Lit).map_err(D::Error::custom)
    }
}

/// `T` from `v`, or from `v` read the other way where YAML and expressions blur the line: the
/// text `"200"` for a number (a quoted scalar, a string param), `200` for a string (an
/// unquoted tag).
pub fn lenient<T: DeserializeOwned>(v: Json) -> Result<T, String> {
    let first = match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    let other = match &v {
        Json::String(s) => match s.trim() {
            "true" => Some(Json::Bool(true)),
            "false" => Some(Json::Bool(false)),
            t => serde_json::from_str::<serde_json::Number>(t)
                .ok()
                .map(Json::Number),
        },
        Json::Number(n) => Some(Json::String(n.to_string())),
        Json::Bool(b) => Some(Json::String(b.to_string())),
        _ => None,
    };
    other
        .and_then(|o| serde_json::from_value::<T>(o).ok())
        .ok_or(first)
}

/// Where in `with` a problem is: map keys and list indexes from the top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A problem with a step's `with`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithError {
    /// The value at fault (for an unknown field: the field itself).
    pub path: Vec<PathSeg>,
    pub message: String,
}

impl WithError {
    /// `with.health.timeout`, `with.tags[2]`.
    pub fn dotted(&self) -> String {
        let mut out = String::from("with");
        for seg in &self.path {
            match seg {
                PathSeg::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                PathSeg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

/// Checks `with` (JSON, templated strings as [`EXPR_KEY`] markers) against `A::With`: every
/// problem, not just the first (a field at fault is left out and the rest checked again).
pub fn check<A: ActionDef>(with: &Json) -> Vec<WithError> {
    let mut errors = Vec::new();
    let mut current = with.clone();
    for _ in 0..64 {
        match decode::<A::With>(&current) {
            Ok(_) => break,
            Err(e) => {
                let missing = e.message.starts_with("missing field");
                // A required field that was left out because it was wrong is not missing too:
                // the struct that needs it is left out instead, and the rest checked.
                let reported = missing
                    && errors.iter().any(|old: &WithError| {
                        old.path.len() > e.path.len() && old.path.starts_with(&e.path)
                    });
                let again = (!missing || reported) && remove(&mut current, &e.path);
                if !reported {
                    errors.push(e);
                }
                if !again {
                    break;
                }
            }
        }
    }
    errors
}

/// `T` from `with`, or the first problem with its path.
pub fn decode<T: DeserializeOwned>(with: &Json) -> Result<T, WithError> {
    serde_path_to_error::deserialize::<_, T>(with.clone()).map_err(|e| {
        let mut path: Vec<PathSeg> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(PathSeg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathSeg::Index(*index)),
                _ => None,
            })
            .collect();
        let inner = e.into_inner().to_string();
        // Point at an unknown field itself (where the path stops at its map).
        if let Some(name) = unknown_field(&inner)
            && path.last() != Some(&PathSeg::Key(name.to_string()))
        {
            path.push(PathSeg::Key(name.to_string()));
        }
        WithError {
            path,
            message: inner,
        }
    })
}

/// The name in serde's "unknown field `x`, expected ...".
pub fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// Removes the value at `path`; whether there was one.
fn remove(v: &mut Json, path: &[PathSeg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = v;
    for seg in parents {
        at = match (seg, at) {
            (PathSeg::Key(k), Json::Object(m)) => match m.get_mut(k) {
                Some(next) => next,
                None => return false,
            },
            (PathSeg::Index(i), Json::Array(a)) => match a.get_mut(*i) {
                Some(next) => next,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, at) {
        (PathSeg::Key(k), Json::Object(m)) => m.remove(k).is_some(),
        (PathSeg::Index(i), Json::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

/// An action as the catalog holds it, whatever its types.
pub trait Spec: Send + Sync {
    fn name(&self) -> &'static str;
    fn doc(&self) -> &'static str;
    fn outputs(&self) -> &'static [&'static str];
    /// Every problem with `with` (see [`check`]).
    fn check(&self, with: &Json) -> Vec<WithError>;
}

struct SpecOf<A>(PhantomData<fn() -> A>);

impl<A: ActionDef> Spec for SpecOf<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }
    fn doc(&self) -> &'static str {
        A::DOC
    }
    fn outputs(&self) -> &'static [&'static str] {
        A::OUTPUTS
    }
    fn check(&self, with: &Json) -> Vec<WithError> {
        check::<A>(with)
    }
}

impl fmt::Debug for dyn Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! catalog {
    ($($a:ty),* $(,)?) => {
        /// Every built-in action.
        pub static ACTIONS: &[&dyn Spec] = &[$(&SpecOf::<$a>(PhantomData)),*];
    };
}
for_each_action!(catalog);

pub fn find(name: &str) -> Option<&'static dyn Spec> {
    ACTIONS.iter().copied().find(|a| a.name() == name)
}

/// An action's outputs as `steps.ID.outputs` holds them: each field as text.
pub fn outputs_text<O: Serialize>(outputs: &O) -> Result<Vec<(String, String)>, String> {
    match serde_json::to_value(outputs).map_err(|e| e.to_string())? {
        Json::Object(m) => Ok(m
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| {
                let text = match v {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect()),
        other => Err(format!("outputs must be a struct, got {other}")),
    }
}

/// A duration written as text (`30s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationText(pub Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse(&text)
            .map(DurationText)
            .map_err(D::Error::custom)
    }
}

/// An HTTP status code: 100 to 599.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpStatus(pub u16);

impl<'de> Deserialize<'de> for HttpStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(code @ 100..=599) => Ok(HttpStatus(code)),
            _ => Err(D::Error::custom(format!(
                "`{n}` is not an HTTP status (they run from 100 to 599)"
            ))),
        }
    }
}

/// A plain `http://host[:port][/path]` URL (checks on the node itself; no TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub text: String,
    /// `host:port` (port 80 when none is written).
    pub authority: String,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(if url.starts_with("https://") {
                format!(
                    "`{url}`: http/wait speaks plain http:// (it is for health checks on the node itself)"
                )
            } else {
                format!("`{url}` is not an http:// URL")
            });
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty()
            || authority.contains(['@', ' '])
            || path.contains([' ', '\r', '\n'])
        {
            return Err(format!("`{url}` is not a valid URL"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(HttpUrl {
            text: url.to_string(),
            authority,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
        })
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HttpUrl::parse(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use serde_json::json;

    /// A `with` of the shape the Docker actions need: nested, lists, maps, an enum.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Deploy {
        name: Val<String>,
        ports: Vec<Val<String>>,
        #[serde(default)]
        env: BTreeMap<String, Val<String>>,
        health: Option<Health>,
        restart: Option<Restart>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Health {
        http: Val<HttpUrl>,
        timeout: Option<Val<DurationText>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Restart {
        No,
        OnFailure,
        Always,
    }

    struct DeployDef;
    impl ActionDef for DeployDef {
        const NAME: &'static str = "test/deploy";
        const DOC: &'static str = "";
        type With = Deploy;
        type Outputs = ();
        const OUTPUTS: &'static [&'static str] = &[];
    }

    fn expr(text: &str) -> Json {
        json!({ EXPR_KEY: text })
    }

    #[test]
    fn nested_with_is_checked_whole_with_paths() {
        let good = json!({
            "name": "app", "ports": ["8080:80", expr("${{ params.port }}:80")],
            "env": { "A": "1", "B": expr("${{ secrets.B }}") },
            "health": { "http": "http://127.0.0.1:8080/", "timeout": "20s" },
            "restart": "on-failure"
        });
        assert_eq!(check::<DeployDef>(&good), []);
        let bad = json!({
            "name": "app", "ports": ["8080:80", 8],
            "health": { "http": "https://x/", "timeout": "soon", "retries": 3 },
            "restart": "sometimes", "colour": "blue"
        });
        let got: Vec<String> = check::<DeployDef>(&bad)
            .iter()
            .map(|e| format!("{}: {}", e.dotted(), e.message))
            .collect();
        // "8" reads as the text "8" (a port list written unquoted is fine).
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(
            got.iter()
                .any(|g| g.starts_with("with.health.http: `https://x/`")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("with.health.timeout: `soon`")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("with.health.retries: unknown field")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("with.restart: unknown variant `sometimes`")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("with.colour: unknown field")),
            "{got:#?}"
        );
        let missing = check::<DeployDef>(&json!({ "ports": [] }));
        assert_eq!(missing.len(), 1);
        assert!(
            missing[0].message.contains("missing field `name`"),
            "{missing:?}"
        );
    }

    #[test]
    fn literals_are_read_leniently_and_checked() {
        assert_eq!(lenient::<HttpStatus>(json!("204")), Ok(HttpStatus(204)));
        assert_eq!(lenient::<String>(json!(1.5)), Ok("1.5".to_string()));
        assert!(lenient::<HttpStatus>(json!(70000)).is_err());
        assert!(lenient::<HttpStatus>(json!("ok")).is_err());
        assert_eq!(
            HttpUrl::parse("http://h").map(|u| (u.authority, u.path)),
            Ok(("h:80".into(), "/".into()))
        );
        for bad in [
            "file:///etc/passwd",
            "https://x/",
            "http://",
            "http://u@h/",
            "ftp://x",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// Every action's `OUTPUTS` are the fields of its `Outputs`.
    #[test]
    fn declared_outputs_match_the_outputs_struct() {
        macro_rules! outputs_agree {
            ($($a:ty),* $(,)?) => {$(
                let fields: Vec<String> = outputs_text(&<$a as ActionDef>::Outputs::default())
                    .expect("a struct")
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                let mut declared: Vec<&str> = <$a as ActionDef>::OUTPUTS.to_vec();
                declared.sort_unstable();
                assert_eq!(fields, declared, "{}", <$a as ActionDef>::NAME);
            )*};
        }
        for_each_action!(outputs_agree);
    }
}
