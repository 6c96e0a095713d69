//! Loading a pipeline file: YAML tree -> checked model, collecting every diagnostic.
//!
//! Pure: the only input is the text given. Pass 1 walks the tree, checking shapes and types and
//! parsing expressions; pass 2 checks what the expressions refer to, once every step id is known.

mod on;
mod refs;
mod step;

use refs::Refs;

use std::str::FromStr;

use super::*;
use crate::actions;
use crate::diag::{Diagnostic, Lines, Pos, did_you_mean};
use crate::duration;
use crate::expr::{self, Expr, ExprError, Template};
use crate::yaml::{self, Key, Node, Style, Value};

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "on",
    "params",
    "env",
    "runs_on",
    "concurrency",
    "timeout",
    "steps",
    "finally",
    "retention",
    "permissions",
];
/// What a pipeline may ask for beyond an isolated step's powers.
const PERMISSIONS: &[&str] = &["docker"];
const STEP_KEYS: &[&str] = &[
    "id",
    "name",
    "run",
    "uses",
    "with",
    "if",
    "env",
    "timeout",
    "retry",
    "continue_on_error",
    "working_directory",
];
const PARAM_KEYS: &[&str] = &["type", "default", "description", "options", "required"];
const ON_KEYS: &[&str] = &["manual", "webhook", "schedule"];
const WEBHOOK_KEYS: &[&str] = &[
    "hook", "secret", "events", "branches", "tags", "paths", "if", "params",
];
const SCHEDULE_KEYS: &[&str] = &["cron", "timezone", "missed", "params"];
const RETRY_KEYS: &[&str] = &["count", "backoff"];
const RETENTION_KEYS: &[&str] = &["max_age", "max_runs"];
const RUN_FIELDS: &[&str] = &["id", "number", "pipeline", "status", "trigger"];
const ROOTS: &[&str] = &["params", "env", "secrets", "steps", "run"];
const MAX_STEPS: usize = 1000;
const MAX_RETRIES: u32 = 100;

/// Whether `name` may name a pipeline (it appears in URLs): a letter or digit, then letters,
/// digits, `-`, `_` or `.`, at most 100 characters.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.len() <= 100
}

/// An id, param or output name: a letter or `_`, then letters, digits, `_` and `-`.
pub fn valid_ident(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What the loader is told beyond the text (it still does no IO).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// The registries skiff's config declares: `docker/push`'s `with.registry` must name one.
    /// None: not known here (a run's snapshot is loaded again without them; the worker checks).
    pub registries: Option<Vec<String>>,
}

/// Loads a pipeline from its text. `default_name` (the file stem) names it when the file has no
/// `name:`. Returns the pipeline, or every problem found, ordered by position.
pub fn load(source: &str, default_name: &str) -> Result<Pipeline, Vec<Diagnostic>> {
    load_with(source, default_name, &LoadOptions::default())
}

/// [`load`], with what skiff's config declares.
pub fn load_with(
    source: &str,
    default_name: &str,
    options: &LoadOptions,
) -> Result<Pipeline, Vec<Diagnostic>> {
    let (root, yaml_diags) = yaml::parse(source, &yaml::Limits::default())?;
    let mut cx = Cx {
        lines: Lines::new(source),
        diags: yaml_diags,
        sites: Vec::new(),
        suggest_budget: SUGGEST_BUDGET,
        registries: options.registries.as_deref(),
    };
    let mut pipeline = cx.pipeline(&root, default_name);
    let sites = std::mem::take(&mut cx.sites);
    if let Some(p) = &pipeline {
        let mut refs = Refs::new(p);
        for site in &sites {
            cx.check_refs(&mut refs, site);
        }
        let secrets = refs.secrets();
        if let Some(p) = &mut pipeline {
            p.secrets = secrets;
        }
    }
    let mut diags = cx.diags;
    diags.sort_by_key(|d| d.pos);
    diags.dedup();
    match pipeline {
        Some(p) if diags.is_empty() => Ok(p),
        _ => Err(diags),
    }
}

/// Where an expression stands, which decides what it may refer to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ctx {
    /// Pipeline `env:` and `concurrency:`.
    Pipeline,
    /// `on.webhook.secret`: secrets only.
    WebhookSecret,
    /// `on.webhook.params` and `on.webhook.if`: `event` only.
    Webhook,
    /// A step's fields; `condition` is true for its `if:`, where status functions are allowed.
    Step {
        phase: Phase,
        index: usize,
        condition: bool,
    },
}

struct Site<'n> {
    node: &'n Node,
    /// Byte offset of the expression's `${{` in the scalar (0 for a bare `if:`).
    offset: usize,
    expr: Expr,
    ctx: Ctx,
}

struct Cx<'s, 'n> {
    lines: Lines<'s>,
    diags: Vec<Diagnostic>,
    sites: Vec<Site<'n>>,
    /// Candidate comparisons left for suggestions among names the file declares.
    suggest_budget: usize,
    /// The registries skiff's config declares, when known.
    registries: Option<&'s [String]>,
}

/// How many candidate comparisons the suggestions for one file may make, over names the file
/// declares (params, env, step ids): thousands of typos among thousands of names would otherwise
/// take seconds.
const SUGGEST_BUDGET: usize = 1_000_000;

/// `did you mean ...?` among `n` candidates, while `budget` lasts.
fn budgeted_did_you_mean<'a>(
    budget: &mut usize,
    word: &str,
    n: usize,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    *budget = budget.checked_sub(n)?;
    did_you_mean(word, candidates)
}

/// The entries of a mapping whose keys were checked against an allowed list.
struct Fields<'n> {
    entries: &'n [(Key, Node)],
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
    }

    /// Like `get`, but a null value (`key:` with nothing after it) counts as absent.
    fn value(&self, name: &str) -> Option<&'n Node> {
        self.get(name).filter(|n| !n.is_null())
    }

    fn key(&self, name: &str) -> Option<&'n Key> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(k, _)| k)
    }
}

impl<'s, 'n> Cx<'s, 'n> {
    fn error(&mut self, pos: Pos, msg: impl Into<String>) -> &mut Diagnostic {
        self.diags.push(Diagnostic::new(pos, msg));
        self.diags.last_mut().expect("just pushed")
    }

    fn type_error(&mut self, node: &Node, what: &str, expected: &str) {
        let found = match node.as_scalar() {
            Some((text, _)) if !node.is_null() => format!("`{}`", truncate(text, 40)),
            _ => node.kind_name().to_string(),
        };
        self.error(
            node.pos,
            format!("{what} must be {expected}, found {found}"),
        );
    }

    /// Checks that `node` is a mapping with only `allowed` keys; reports every unknown key.
    fn map(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        match &node.value {
            Value::Map(entries) => {
                for (k, _) in entries {
                    if !allowed.contains(&k.name.as_str()) {
                        let help = did_you_mean(&k.name, allowed.iter().copied())
                            .unwrap_or_else(|| format!("{what} takes: {}", allowed.join(", ")));
                        self.error(k.pos, format!("unknown key `{}` in {what}", k.name))
                            .set_len(k.name.chars().count())
                            .help = Some(help);
                    }
                }
                Some(Fields { entries })
            }
            _ => {
                self.type_error(node, what, "a mapping");
                None
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match node.as_scalar() {
            Some((text, _)) if !node.is_null() => Some(text.to_string()),
            _ => {
                self.type_error(node, what, "a string");
                None
            }
        }
    }

    /// A string that holds no expression.
    fn literal(&mut self, node: &Node, what: &str) -> Option<String> {
        let s = self.string(node, what)?;
        if let Some(k) = s.find("${{") {
            let pos = node.pos_in_scalar(&self.lines, k, "${{");
            self.error(pos, format!("{what} cannot hold an expression"))
                .set_len(3);
            return None;
        }
        Some(s)
    }

    fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.as_scalar() {
            Some(("true", Style::Plain)) => Some(true),
            Some(("false", Style::Plain)) => Some(false),
            Some((text, Style::Plain)) if is_yaml11_bool(text) => {
                self.error(
                    node.pos,
                    format!("{what} must be true or false, found `{text}`"),
                )
                .set_len(text.len())
                .help = Some(yaml11_hint(text));
                None
            }
            _ => {
                self.type_error(node, what, "true or false");
                None
            }
        }
    }

    fn uint(&mut self, node: &Node, what: &str, max: u32) -> Option<u32> {
        match node.as_scalar() {
            Some((text, Style::Plain))
                if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() =>
            {
                match text.parse::<u32>() {
                    Ok(n) if n <= max => Some(n),
                    _ => {
                        self.error(
                            node.pos,
                            format!("{what} must be at most {max}, found `{text}`"),
                        );
                        None
                    }
                }
            }
            _ => {
                self.type_error(node, what, "a whole number");
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<std::time::Duration> {
        let text = self.string(node, what)?;
        match duration::parse(&text) {
            Ok(d) => Some(d),
            Err(msg) => {
                self.error(node.pos, format!("{what}: {msg}"))
                    .set_len(text.chars().count());
                None
            }
        }
    }

    /// A string, or a list of strings; a single string stands for a list of one.
    fn string_list(&mut self, node: &'n Node, what: &str) -> Vec<String> {
        match &node.value {
            Value::Seq(items) => items.iter().filter_map(|i| self.string(i, what)).collect(),
            _ if node.is_null() => Vec::new(),
            _ => self.string(node, what).into_iter().collect(),
        }
    }

    fn expr_error(&mut self, node: &Node, base: usize, e: ExprError) {
        let text = node.as_scalar().map(|(t, _)| t).unwrap_or("");
        let start = base + e.start;
        let needle = text
            .get(start..(start + e.len).min(text.len()))
            .unwrap_or("");
        let pos = node.pos_in_scalar(&self.lines, start, needle);
        self.error(pos, e.message).set_len(e.len).help = e.help;
    }

    /// A string that may hold expressions; records them for the reference pass.
    fn template(&mut self, node: &'n Node, what: &str, ctx: Ctx) -> Option<Template> {
        let text = match node.as_scalar() {
            Some((text, _)) => text,
            None => {
                self.type_error(node, what, "a string");
                return None;
            }
        };
        match Template::parse(text) {
            Ok(t) => {
                for (e, offset) in t.exprs() {
                    self.sites.push(Site {
                        node,
                        offset,
                        expr: e.clone(),
                        ctx,
                    });
                }
                Some(t)
            }
            Err(errors) => {
                for e in errors {
                    self.expr_error(node, 0, e);
                }
                None
            }
        }
    }

    fn env(&mut self, node: &'n Node, what: &str, ctx: Ctx) -> Vec<EnvVar> {
        let Value::Map(entries) = &node.value else {
            if !node.is_null() {
                self.type_error(node, what, "a mapping of NAME: value");
            }
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            if !valid_env_name(&k.name) {
                self.error(
                    k.pos,
                    format!("`{}` is not a valid environment variable name", k.name),
                )
                .set_len(k.name.chars().count())
                .help = Some("use letters, digits and `_`, not starting with a digit".into());
                continue;
            }
            if k.name.starts_with("SKIFF_") {
                self.error(
                    k.pos,
                    format!("`{}`: names starting with SKIFF_ are set by skiff", k.name),
                )
                .set_len(k.name.chars().count());
                continue;
            }
            if matches!(v.value, Value::Seq(_) | Value::Map(_)) {
                self.type_error(v, &format!("env `{}`", k.name), "a string");
                continue;
            }
            let value = if v.is_null() {
                Some(Template::literal(""))
            } else {
                self.template(v, &format!("env `{}`", k.name), ctx)
            };
            if let Some(value) = value {
                out.push(EnvVar {
                    name: k.name.clone(),
                    value,
                });
            }
        }
        out
    }

    fn pipeline(&mut self, root: &'n Node, default_name: &str) -> Option<Pipeline> {
        let top = self.map(root, "the pipeline", TOP_KEYS)?;
        let name = match top.value("name") {
            Some(n) => {
                let name = self.literal(n, "`name`").unwrap_or_default();
                if !name.is_empty() && !valid_name(&name) {
                    self.error(n.pos, format!("pipeline name `{name}` is not valid"))
                        .set_len(name.chars().count())
                        .help = Some(
                        "use letters, digits, `-`, `_` and `.`, starting with a letter or digit"
                            .into(),
                    );
                }
                name
            }
            None => {
                if !valid_name(default_name) {
                    self.error(
                        Pos::new(1, 1),
                        format!("the file name `{default_name}` is not a valid pipeline name"),
                    )
                    .help = Some("add `name:` with letters, digits, `-`, `_` and `.`".into());
                }
                default_name.to_string()
            }
        };
        let description = top
            .value("description")
            .and_then(|n| self.literal(n, "`description`"));
        let params = top
            .value("params")
            .map(|n| self.params(n))
            .unwrap_or_default();
        let env = top
            .value("env")
            .map(|n| self.env(n, "`env`", Ctx::Pipeline))
            .unwrap_or_default();
        let runs_on = top
            .value("runs_on")
            .map(|n| self.string_list(n, "`runs_on`"))
            .unwrap_or_default();
        let concurrency = top
            .value("concurrency")
            .and_then(|n| self.template(n, "`concurrency`", Ctx::Pipeline));
        let timeout = top
            .value("timeout")
            .and_then(|n| self.duration(n, "`timeout`"));
        let on = match top.get("on") {
            Some(n) => self.triggers(n, &params, &name),
            None => Triggers {
                manual: true,
                ..Triggers::default()
            },
        };
        let steps = match top.value("steps") {
            Some(n) => self.steps(n, Phase::Main),
            None => {
                // A misspelt `steps` is already reported with a suggestion; do not say it twice.
                let misspelt = top.entries.iter().any(|(k, _)| {
                    k.name != "steps" && crate::diag::suggest(&k.name, ["steps"]).is_some()
                });
                if !misspelt {
                    let pos = top.key("steps").map_or(Pos::new(1, 1), |k| k.pos);
                    self.error(pos, "a pipeline needs at least one step in `steps`");
                }
                Vec::new()
            }
        };
        let finally = top
            .value("finally")
            .map(|n| self.steps(n, Phase::Finally))
            .unwrap_or_default();
        let retention = top
            .value("retention")
            .map(|n| self.retention(n))
            .unwrap_or_default();
        let permissions = top
            .value("permissions")
            .map(|n| self.permissions(n))
            .unwrap_or_default();
        self.check_step_ids(&steps, &finally, &top);
        Some(Pipeline {
            name,
            description,
            on,
            params,
            env,
            runs_on,
            concurrency,
            timeout,
            steps,
            finally,
            retention,
            permissions,
            // Filled by the reference pass.
            secrets: Vec::new(),
        })
    }

    fn permissions(&mut self, node: &'n Node) -> Vec<Permission> {
        let items: Vec<&'n Node> = match &node.value {
            Value::Seq(items) => items.iter().collect(),
            _ if node.is_null() => Vec::new(),
            _ => vec![node],
        };
        let mut out = Vec::new();
        for item in items {
            let Some(name) = self.string(item, "a permission") else {
                continue;
            };
            match name.as_str() {
                "docker" => {
                    if !out.contains(&Permission::Docker) {
                        out.push(Permission::Docker);
                    }
                }
                other => {
                    let help = did_you_mean(other, PERMISSIONS.iter().copied())
                        .unwrap_or_else(|| format!("permissions: {}", PERMISSIONS.join(", ")));
                    self.error(item.pos, format!("unknown permission `{other}`"))
                        .set_len(other.chars().count())
                        .help = Some(help);
                }
            }
        }
        out
    }

    fn retention(&mut self, node: &'n Node) -> Retention {
        let Some(f) = self.map(node, "`retention`", RETENTION_KEYS) else {
            return Retention::default();
        };
        let max_age = f.value("max_age").and_then(|n| {
            let what = "`retention.max_age`";
            let text = self.string(n, what)?;
            let problem = match duration::parse_up_to(&text, Retention::MAX_AGE) {
                Ok(d) if d >= Retention::MIN_AGE => return Some(d),
                Ok(_) => format!(
                    "`{}` is shorter than the minimum of {}",
                    text.trim(),
                    duration::written(Retention::MIN_AGE)
                ),
                Err(msg) => msg,
            };
            self.error(n.pos, format!("{what}: {problem}"))
                .set_len(text.chars().count());
            None
        });
        let max_runs = f.value("max_runs").and_then(|n| {
            let what = "`retention.max_runs`";
            match self.uint(n, what, u32::MAX)? {
                0 => {
                    self.error(n.pos, format!("{what} must be at least 1, found `0`"))
                        .help = Some("leave `max_runs` out to use the server's default".into());
                    None
                }
                count => Some(count),
            }
        });
        Retention { max_age, max_runs }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max - 1).collect::<String>())
    }
}

/// Whether a YAML 1.1 boolean spelling means true.
fn yaml11_truthy(text: &str) -> bool {
    matches!(
        text.to_ascii_lowercase().as_str(),
        "yes" | "y" | "on" | "true"
    )
}

/// The help for a YAML 1.1 boolean where skiff wants `true` or `false`.
fn yaml11_hint(text: &str) -> String {
    format!(
        "`{text}` is not a boolean in skiff's YAML; write `{}`",
        yaml11_truthy(text)
    )
}

/// Whether a node is a plain (unquoted) YAML 1.1 boolean such as `yes`.
fn is_plain_yaml11_bool(node: &Node) -> bool {
    matches!(node.as_scalar(), Some((text, Style::Plain)) if is_yaml11_bool(text))
}

/// The YAML 1.1 spellings of booleans that YAML 1.2 (and skiff) read as plain strings.
fn is_yaml11_bool(text: &str) -> bool {
    matches!(
        text,
        "yes"
            | "Yes"
            | "YES"
            | "no"
            | "No"
            | "NO"
            | "on"
            | "On"
            | "ON"
            | "off"
            | "Off"
            | "OFF"
            | "y"
            | "Y"
            | "n"
            | "N"
            | "True"
            | "TRUE"
            | "False"
            | "FALSE"
    )
}
