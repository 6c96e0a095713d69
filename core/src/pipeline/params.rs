//! Checking the params a run is given against the params its pipeline declares. These are the
//! only param rules: the API, the UI's form, `skiff run --param` and the loader (defaults,
//! schedule params) all come through here.

use std::collections::BTreeMap;

use super::{ParamKind, Pipeline};
use crate::diag::did_you_mean;

/// The longest value one param may have, in bytes. A param reaches its steps as one environment
/// string (`SKIFF_PARAM_NAME=value`), and Linux refuses to start a process with an environment
/// string over 128 KiB; 32 KiB leaves room for the name and for the same value in a step's `env`.
pub const MAX_PARAM_VALUE: usize = 32 << 10;
/// The most bytes all of a run's params may take together (names and values): they all go into
/// every step's environment, and the whole of it shares the kernel's limit with the arguments.
pub const MAX_PARAMS_TOTAL: usize = 256 << 10;

/// A problem with one given param, for field-level error reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

/// `value` for an error message: at most 60 characters, so a huge value is not echoed back.
fn shown(value: &str) -> String {
    match value.char_indices().nth(60) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_string(),
    }
}

fn kib(bytes: usize) -> String {
    format!("{} KiB", bytes >> 10)
}

impl super::Param {
    /// The value expressions see for this param, given its text (`None`: the run was not given
    /// it and it has no default). A boolean is `true`/`false`, a number a number, so that
    /// `if: params.dry_run` is false for `dry_run=false` and `params.a > params.b` compares
    /// numbers; strings and choices stay text; an absent param is `null`. The environment
    /// variables (`SKIFF_PARAM_*`) stay text whatever the type.
    pub fn typed(&self, text: Option<&str>) -> crate::expr::Value {
        use crate::expr::Value;
        let Some(text) = text else {
            return Value::Null;
        };
        match self.kind {
            ParamKind::Boolean => match text {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                // Checked when the run was created; a stored run from another version is read
                // as text rather than guessed at.
                other => Value::String(other.to_string()),
            },
            ParamKind::Number => match text.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => Value::Number(n),
                _ => Value::String(text.to_string()),
            },
            ParamKind::String | ParamKind::Choice => Value::String(text.to_string()),
        }
    }
}

/// Whether `value` is acceptable for `param`; the error is a phrase for the user.
pub(crate) fn check_value(param: &super::Param, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err("contains a NUL character, which an environment variable cannot hold".into());
    }
    if value.len() > MAX_PARAM_VALUE {
        return Err(format!(
            "is {} bytes long; a param's value is at most {} ({MAX_PARAM_VALUE} bytes)",
            value.len(),
            kib(MAX_PARAM_VALUE)
        ));
    }
    match param.kind {
        ParamKind::String => Ok(()),
        ParamKind::Boolean if matches!(value, "true" | "false") => Ok(()),
        ParamKind::Boolean => Err(format!("expected true or false, got `{}`", shown(value))),
        ParamKind::Number if value.trim().parse::<f64>().is_ok_and(f64::is_finite) => Ok(()),
        ParamKind::Number => Err(format!("expected a number, got `{}`", shown(value))),
        ParamKind::Choice if param.options.iter().any(|o| o == value) => Ok(()),
        ParamKind::Choice => Err(format!(
            "`{}` is not one of: {}",
            shown(value),
            param.options.join(", ")
        )),
    }
}

/// Whether `""` given for `param` means "not given": for every kind but an optional string an
/// empty value is no value (a form's empty number field, a choice left on its placeholder), so
/// the default applies and a required param without one is reported as missing. An optional
/// string may be set to `""` on purpose.
fn empty_is_absent(param: &super::Param) -> bool {
    param.required || param.kind != ParamKind::String
}

/// The full set of params for a run: the given ones checked, defaults filled in. A param that is
/// neither given nor defaulted is absent from the result (expressions see `null`; its
/// `SKIFF_PARAM_*` variable is empty). Every problem is returned, not just the first, each
/// naming its param.
pub fn resolve_params(
    pipeline: &Pipeline,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
    let mut errors = Vec::new();
    let mut out = BTreeMap::new();
    // Given params that were dealt with (taken, or reported as wrong).
    let mut dealt_with = std::collections::BTreeSet::new();
    for (name, value) in given {
        match pipeline.param(name) {
            None => {
                let hint = did_you_mean(name, pipeline.params.iter().map(|p| p.name.as_str()))
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                errors.push(ParamError {
                    param: shown(name),
                    message: format!("unknown param{hint}"),
                });
            }
            Some(p) if value.is_empty() && empty_is_absent(p) => {}
            Some(p) => {
                dealt_with.insert(name.as_str());
                match check_value(p, value) {
                    Ok(()) => {
                        out.insert(name.clone(), value.clone());
                    }
                    Err(message) => errors.push(ParamError {
                        param: name.clone(),
                        message,
                    }),
                }
            }
        }
    }
    for p in &pipeline.params {
        if dealt_with.contains(p.name.as_str()) {
            continue;
        }
        match &p.default {
            Some(d) => {
                out.insert(p.name.clone(), d.clone());
            }
            None if p.required => {
                let message = if given.contains_key(&p.name) {
                    "required: give it a value (empty is not one)"
                } else {
                    "required, and has no default"
                };
                errors.push(ParamError {
                    param: p.name.clone(),
                    message: message.into(),
                });
            }
            None => {}
        }
    }
    if errors.is_empty() {
        let total: usize = out.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > MAX_PARAMS_TOTAL {
            // Named after the largest given value: the one most worth shortening.
            let largest = out
                .iter()
                .filter(|(k, _)| given.contains_key(*k))
                .max_by_key(|(_, v)| v.len())
                .or_else(|| out.iter().max_by_key(|(_, v)| v.len()))
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            errors.push(ParamError {
                param: largest,
                message: format!(
                    "the params come to {total} bytes in all; together they are at most {} \
                     ({MAX_PARAMS_TOTAL} bytes)",
                    kib(MAX_PARAMS_TOTAL)
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(params: &str) -> Pipeline {
        let yaml = format!("params:\n{params}steps:\n  - run: echo\n");
        crate::pipeline::load(&yaml, "p").expect("a valid pipeline")
    }

    fn given(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn a_value_is_at_most_32_kib_and_holds_no_nul() {
        let p = pipeline("  who: { default: x }\n  n: { type: number, default: \"1\" }\n");
        let ok = resolve_params(&p, &given(&[("who", "x".repeat(MAX_PARAM_VALUE))]));
        assert_eq!(ok.map(|o| o["who"].len()), Ok(MAX_PARAM_VALUE));
        for (name, value, needle) in [
            ("who", "x".repeat(MAX_PARAM_VALUE + 1), "at most 32 KiB"),
            ("who", "a\0b".to_string(), "NUL"),
            ("n", "1\0".to_string(), "NUL"),
            ("n", "9".repeat(MAX_PARAM_VALUE + 1), "at most 32 KiB"),
        ] {
            let errors = resolve_params(&p, &given(&[(name, value)])).expect_err(needle);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].param, name);
            assert!(errors[0].message.contains(needle), "{errors:?}");
        }
        // A wrong value is not echoed whole.
        let errors = resolve_params(&p, &given(&[("n", "z".repeat(1000))])).expect_err("n");
        assert!(errors[0].message.len() < 100, "{errors:?}");
    }

    #[test]
    fn all_params_together_are_at_most_256_kib() {
        let names: Vec<String> = (0..9).map(|i| format!("p{i}")).collect();
        let yaml: String = names
            .iter()
            .map(|n| format!("  {n}: {{ default: \"\" }}\n"))
            .collect();
        let p = pipeline(&yaml);
        let value = "x".repeat(MAX_PARAM_VALUE - 100);
        let eight: Vec<(&str, String)> = names[..8]
            .iter()
            .map(|n| (n.as_str(), value.clone()))
            .collect();
        assert!(resolve_params(&p, &given(&eight)).is_ok());
        let mut nine = eight.clone();
        nine.push(("p8", "y".repeat(MAX_PARAM_VALUE - 50)));
        let errors = resolve_params(&p, &given(&nine)).expect_err("too much");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].param, "p8", "named after the largest value");
        assert!(errors[0].message.contains("256 KiB"), "{errors:?}");
    }
}

#[cfg(test)]
mod absent {
    use super::*;
    use crate::expr::Value;

    fn pipeline() -> Pipeline {
        let yaml = "params:\n  s: {}\n  rs: { required: true }\n  n: { type: number }\n  \
                    b: { type: boolean, default: true }\n  c: { type: choice, options: [x, y], required: true }\n\
                    steps:\n  - run: echo\n";
        crate::pipeline::load(yaml, "p").expect("a valid pipeline")
    }

    fn given(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_is_absent_except_for_an_optional_string() {
        let p = pipeline();
        let out = resolve_params(&p, &given(&[("s", ""), ("rs", "r"), ("n", ""), ("c", "x")]))
            .expect("fits");
        assert_eq!(
            out,
            given(&[("s", ""), ("rs", "r"), ("b", "true"), ("c", "x")])
        );
        let errors =
            resolve_params(&p, &given(&[("rs", ""), ("c", "")])).expect_err("two are missing");
        let named: Vec<&str> = errors.iter().map(|e| e.param.as_str()).collect();
        assert_eq!(named, ["rs", "c"]);
        assert!(
            errors.iter().all(|e| e.message.contains("required")),
            "{errors:?}"
        );
    }

    #[test]
    fn expressions_see_typed_values() {
        let p = pipeline();
        let b = p.param("b").expect("b");
        let n = p.param("n").expect("n");
        assert_eq!(b.typed(Some("false")), Value::Bool(false));
        assert!(!b.typed(Some("false")).truthy());
        assert_eq!(n.typed(Some(" 10 ")), Value::Number(10.0));
        assert_eq!(n.typed(None), Value::Null);
        assert_eq!(
            p.param("s").expect("s").typed(Some("10")),
            Value::String("10".into())
        );
    }
}
