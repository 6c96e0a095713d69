//! Checking the params a run is given against the params its pipeline declares.

use std::collections::BTreeMap;

use super::{ParamKind, Pipeline};
use crate::diag::did_you_mean;

/// A problem with one given param, for field-level error reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

/// Whether `value` is acceptable for `param`; the error is a phrase for the user.
pub(crate) fn check_value(param: &super::Param, value: &str) -> Result<(), String> {
    match param.kind {
        ParamKind::String => Ok(()),
        ParamKind::Boolean if matches!(value, "true" | "false") => Ok(()),
        ParamKind::Boolean => Err(format!("expected true or false, got `{value}`")),
        ParamKind::Number if value.trim().parse::<f64>().is_ok_and(f64::is_finite) => Ok(()),
        ParamKind::Number => Err(format!("expected a number, got `{value}`")),
        ParamKind::Choice if param.options.iter().any(|o| o == value) => Ok(()),
        ParamKind::Choice => Err(format!(
            "`{value}` is not one of: {}",
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
                    param: name.clone(),
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
        Ok(out)
    } else {
        Err(errors)
    }
}
