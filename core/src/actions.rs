//! The catalog of built-in actions a step can `uses:`: each action's `with` fields and outputs.
//!
//! The worker holds the implementations and deserializes `with` into a typed struct that rejects
//! unknown fields; this catalog lets the loader check a pipeline without knowing the worker.
//! A test in the worker keeps the two in step.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    String,
    Int,
    Bool,
    Duration,
    StringList,
}

impl FieldKind {
    pub fn describe(self) -> &'static str {
        match self {
            FieldKind::String => "a string",
            FieldKind::Int => "a whole number",
            FieldKind::Bool => "true or false",
            FieldKind::Duration => "a duration such as 30s",
            FieldKind::StringList => "a list of strings",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub kind: FieldKind,
    pub required: bool,
    pub doc: &'static str,
    /// Checks a literal value beyond its kind (the error is a phrase for the user). A value with
    /// an expression is checked by the action when the step runs.
    pub check: Option<CheckLiteral>,
}

/// A check of a literal `with` value; the error is a phrase for the user.
pub type CheckLiteral = fn(&str) -> Result<(), String>;

#[derive(Debug)]
pub struct ActionSpec {
    pub name: &'static str,
    pub doc: &'static str,
    pub fields: &'static [Field],
    pub outputs: &'static [&'static str],
}

impl ActionSpec {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

const fn field(name: &'static str, kind: FieldKind, required: bool, doc: &'static str) -> Field {
    Field {
        name,
        kind,
        required,
        doc,
        check: None,
    }
}

impl Field {
    const fn checked(mut self, check: CheckLiteral) -> Field {
        self.check = Some(check);
        self
    }
}

/// The URL forms `http/wait` can request: `http://host[:port][/path]`. It speaks plain HTTP
/// (it is for health checks on the node itself), so `https://` is refused too.
pub fn check_http_url(url: &str) -> Result<(), String> {
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
    if authority.is_empty() || authority.contains(['@', ' ']) || path.contains([' ', '\r', '\n']) {
        return Err(format!("`{url}` is not a valid URL"));
    }
    Ok(())
}

/// An HTTP status code: 100 to 599.
pub fn check_http_status(text: &str) -> Result<(), String> {
    match text.trim().parse::<i64>() {
        Ok(100..=599) => Ok(()),
        _ => Err(format!(
            "`{text}` is not an HTTP status (they run from 100 to 599)"
        )),
    }
}

pub static ACTIONS: &[ActionSpec] = &[ActionSpec {
    name: "http/wait",
    doc: "Wait until an HTTP URL answers with the expected status (a health check).",
    fields: &[
        field(
            "url",
            FieldKind::String,
            true,
            "http:// URL to request with GET",
        )
        .checked(check_http_url),
        field(
            "status",
            FieldKind::Int,
            false,
            "the status that counts as ready (default 200)",
        )
        .checked(check_http_status),
        field(
            "timeout",
            FieldKind::Duration,
            false,
            "how long to keep trying (default 30s)",
        ),
        field(
            "interval",
            FieldKind::Duration,
            false,
            "pause between attempts (default 250ms)",
        ),
    ],
    outputs: &["status", "attempts"],
}];

pub fn find(name: &str) -> Option<&'static ActionSpec> {
    ACTIONS.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_wait_literals() {
        assert!(check_http_url("http://127.0.0.1:8080/health").is_ok());
        assert!(check_http_url("http://example").is_ok());
        for bad in [
            "file:///etc/passwd",
            "https://x/",
            "http://",
            "http://u@h/",
            "ftp://x",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
        assert!(check_http_status("200").is_ok() && check_http_status("599").is_ok());
        for bad in ["99", "600", "70000", "-1"] {
            assert!(check_http_status(bad).is_err(), "{bad}");
        }
    }
}
