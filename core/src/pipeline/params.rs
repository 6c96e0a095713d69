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

/// The full set of params for a run: the given ones checked, defaults filled in. Every problem
/// is returned, not just the first.
pub fn resolve_params(
    pipeline: &Pipeline,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
    let mut errors = Vec::new();
    let mut out = BTreeMap::new();
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
            Some(p) => match check_value(p, value) {
                Ok(()) => {
                    out.insert(name.clone(), value.clone());
                }
                Err(message) => errors.push(ParamError {
                    param: name.clone(),
                    message,
                }),
            },
        }
    }
    for p in &pipeline.params {
        if out.contains_key(&p.name) || given.contains_key(&p.name) {
            continue;
        }
        match &p.default {
            Some(d) => {
                out.insert(p.name.clone(), d.clone());
            }
            None if p.required => {
                errors.push(ParamError {
                    param: p.name.clone(),
                    message: "required, and has no default".into(),
                });
            }
            None => {
                out.insert(p.name.clone(), String::new());
            }
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
