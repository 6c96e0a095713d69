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
}

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
        ),
        field(
            "status",
            FieldKind::Int,
            false,
            "the status that counts as ready (default 200)",
        ),
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
