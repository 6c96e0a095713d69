//! Loading a pipeline file: YAML tree -> checked model, collecting every diagnostic.
//!
//! Pure: the only input is the text given. Pass 1 walks the tree, checking shapes and types and
//! parsing expressions; pass 2 checks what the expressions refer to, once every step id is known.

use std::collections::{HashMap, HashSet};
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
];
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
const WEBHOOK_KEYS: &[&str] = &["secret", "events", "branches"];
const WEBHOOK_EVENTS: &[&str] = &["push", "pull_request", "tag", "release", "ping"];
const SCHEDULE_KEYS: &[&str] = &["cron", "timezone", "params"];
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

/// Loads a pipeline from its text. `default_name` (the file stem) names it when the file has no
/// `name:`. Returns the pipeline, or every problem found, ordered by position.
pub fn load(source: &str, default_name: &str) -> Result<Pipeline, Vec<Diagnostic>> {
    let (root, yaml_diags) = yaml::parse(source, &yaml::Limits::default())?;
    let mut cx = Cx {
        lines: Lines::new(source),
        diags: yaml_diags,
        sites: Vec::new(),
        suggest_budget: SUGGEST_BUDGET,
    };
    let pipeline = cx.pipeline(&root, default_name);
    let sites = std::mem::take(&mut cx.sites);
    if let Some(p) = &pipeline {
        let mut refs = Refs::new(p);
        for site in &sites {
            cx.check_refs(&mut refs, site);
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
            Some(n) => self.triggers(n, &params),
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
        })
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

    fn params(&mut self, node: &'n Node) -> Vec<Param> {
        let Value::Map(entries) = &node.value else {
            self.type_error(node, "`params`", "a mapping of param names");
            return Vec::new();
        };
        let mut out: Vec<Param> = Vec::new();
        // Each param's variable name, and which param has it.
        let mut vars: HashMap<String, usize> = HashMap::new();
        for (k, v) in entries {
            if !valid_ident(&k.name) {
                self.error(k.pos, format!("`{}` is not a valid param name", k.name))
                    .help = Some("use letters, digits, `_` and `-`, starting with a letter".into());
                continue;
            }
            let var = env_key(&k.name);
            if let Some(other) = vars.get(&var).and_then(|&i| out.get(i)) {
                self.error(
                    k.pos,
                    format!(
                        "params `{}` and `{}` would share the variable SKIFF_PARAM_{var}",
                        other.name, k.name,
                    ),
                );
                continue;
            }
            if let Some(p) = self.param(&k.name, v) {
                vars.insert(var, out.len());
                out.push(p);
            }
        }
        out
    }

    fn param(&mut self, name: &str, node: &'n Node) -> Option<Param> {
        let what = format!("param `{name}`");
        let mut p = Param {
            name: name.to_string(),
            kind: ParamKind::String,
            description: None,
            default: None,
            options: Vec::new(),
            required: false,
        };
        if node.is_null() {
            return Some(p);
        }
        if let Some((text, _)) = node.as_scalar() {
            // `who: world` is short for `who: { default: world }`.
            p.default = Some(text.to_string());
            return Some(p);
        }
        let f = self.map(node, &what, PARAM_KEYS)?;
        p.description = f
            .value("description")
            .and_then(|n| self.literal(n, "`description`"));
        p.required = f
            .value("required")
            .and_then(|n| self.bool(n, "`required`"))
            .unwrap_or(false);
        if let Some(n) = f.value("options") {
            match &n.value {
                Value::Seq(items) if !items.is_empty() => {
                    p.options = items
                        .iter()
                        .filter_map(|i| self.literal(i, "an option"))
                        .collect();
                }
                _ => self.type_error(n, "`options`", "a non-empty list"),
            }
        }
        let declared = f.value("type").and_then(|n| {
            let text = self.string(n, "`type`")?;
            let kind = match text.as_str() {
                "string" => ParamKind::String,
                "boolean" => ParamKind::Boolean,
                "number" => ParamKind::Number,
                "choice" => ParamKind::Choice,
                other => {
                    let help = did_you_mean(other, ["string", "boolean", "number", "choice"]);
                    self.error(n.pos, format!("unknown param type `{other}`"))
                        .set_len(other.len())
                        .help =
                        help.or_else(|| Some("types: string, boolean, number, choice".into()));
                    return None;
                }
            };
            Some((kind, n))
        });
        p.kind = match declared {
            Some((ParamKind::Choice, n)) if p.options.is_empty() => {
                self.error(n.pos, format!("{what} is a choice but has no `options`"));
                ParamKind::Choice
            }
            Some((kind, n)) if kind != ParamKind::Choice && !p.options.is_empty() => {
                self.error(
                    n.pos,
                    format!(
                        "{what} has `options`, so its type is `choice`, not `{}`",
                        kind.as_str()
                    ),
                );
                kind
            }
            Some((kind, _)) => kind,
            None if !p.options.is_empty() => ParamKind::Choice,
            None => ParamKind::String,
        };
        if let Some(n) = f.value("default")
            && let Some(text) = self.string(n, "`default`")
        {
            if let Err(msg) = params::check_value(&p, &text) {
                let help = match p.kind {
                    ParamKind::Choice => did_you_mean(&text, p.options.iter().map(String::as_str)),
                    ParamKind::Boolean if is_plain_yaml11_bool(n) => Some(yaml11_hint(&text)),
                    _ => None,
                };
                self.error(n.pos, format!("default of {what}: {msg}"))
                    .set_len(text.chars().count())
                    .help = help;
            }
            p.default = Some(text);
        }
        Some(p)
    }

    fn triggers(&mut self, node: &'n Node, params: &[Param]) -> Triggers {
        let mut t = Triggers {
            manual: true,
            ..Triggers::default()
        };
        if node.is_null() {
            return t;
        }
        if let Some((text, Style::Plain)) = node.as_scalar()
            && (is_yaml11_bool(text) || matches!(text, "true" | "false"))
        {
            // `on: yes` (or `on: false`): a switch where skiff expects the list of triggers.
            let bool_note = if is_yaml11_bool(text) {
                format!("`{text}` is not a boolean in skiff's YAML, and ")
            } else {
                String::new()
            };
            let advice = if yaml11_truthy(text) {
                "manual runs are on by default: drop `on:` or write `on: { manual: true }`"
            } else {
                "to turn manual runs off write `on: { manual: false }`"
            };
            self.error(
                node.pos,
                format!("`on` must be a mapping of triggers, found `{text}`"),
            )
            .set_len(text.chars().count())
            .help = Some(format!("{bool_note}`on` takes triggers; {advice}"));
            return t;
        }
        let Some(f) = self.map(node, "`on`", ON_KEYS) else {
            return t;
        };
        if let Some(n) = f.value("manual") {
            t.manual = self.bool(n, "`on.manual`").unwrap_or(true);
        }
        if let Some(n) = f.value("webhook") {
            t.webhook = self.webhook(n);
        }
        if let Some(n) = f.value("schedule") {
            let params: HashMap<&str, &Param> =
                params.iter().map(|p| (p.name.as_str(), p)).collect();
            let items: Vec<&'n Node> = match &n.value {
                Value::Seq(items) => items.iter().collect(),
                _ => vec![n],
            };
            t.schedules = items
                .into_iter()
                .filter_map(|i| self.schedule(i, &params))
                .collect();
        }
        t
    }

    fn webhook(&mut self, node: &'n Node) -> Option<Webhook> {
        let f = self.map(node, "`on.webhook`", WEBHOOK_KEYS)?;
        let secret = match f.value("secret") {
            None => {
                self.error(
                    node.pos,
                    "a webhook needs a `secret` to check signatures with",
                )
                .help = Some("add `secret: ${{ secrets.HOOK_SECRET }}`".into());
                None
            }
            Some(n) => {
                let t = self.template(n, "`on.webhook.secret`", Ctx::WebhookSecret);
                let only_secret = t.as_ref().is_some_and(|t| matches!(t.parts.as_slice(),
                    [expr::Part::Expr(Expr::Ref { path, .. }, _)] if path.first().is_some_and(|r| r == "secrets")));
                if t.is_some() && !only_secret {
                    self.error(n.pos, "`on.webhook.secret` must be a secret reference, not text in the file")
                        .help = Some("write `secret: ${{ secrets.HOOK_SECRET }}` and provide SKIFF_SECRET_HOOK_SECRET".into());
                }
                t.filter(|_| only_secret)
            }
        };
        let events = match f.value("events") {
            Some(n) => {
                let mut events = Vec::new();
                let items: Vec<&Node> = match &n.value {
                    Value::Seq(items) => items.iter().collect(),
                    _ => vec![n],
                };
                for i in items {
                    let Some(e) = self.string(i, "an event") else {
                        continue;
                    };
                    if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                        let help = did_you_mean(&e, WEBHOOK_EVENTS.iter().copied())
                            .unwrap_or_else(|| format!("events: {}", WEBHOOK_EVENTS.join(", ")));
                        self.error(i.pos, format!("unknown webhook event `{e}`"))
                            .set_len(e.len())
                            .help = Some(help);
                    }
                    events.push(e);
                }
                events
            }
            None => vec!["push".to_string()],
        };
        let branches = f
            .value("branches")
            .map(|n| self.string_list(n, "a branch"))
            .unwrap_or_default();
        Some(Webhook {
            secret: secret?,
            events,
            branches,
        })
    }

    fn schedule(&mut self, node: &'n Node, params: &HashMap<&str, &Param>) -> Option<Schedule> {
        let (cron_node, tz_node, params_node) = match &node.value {
            Value::Scalar { .. } => (node, None, None),
            _ => {
                let f = self.map(node, "a schedule", SCHEDULE_KEYS)?;
                let Some(c) = f.value("cron") else {
                    self.error(node.pos, "a schedule needs `cron`").help =
                        Some("for example `cron: \"0 2 * * *\"`".into());
                    return None;
                };
                (c, f.value("timezone"), f.value("params"))
            }
        };
        let cron_text = self.literal(cron_node, "`cron`")?;
        let cron_ok = match check_cron(&cron_text) {
            Ok(()) => true,
            Err(msg) => {
                self.error(
                    cron_node.pos,
                    format!("bad cron expression `{cron_text}`: {msg}"),
                )
                .set_len(cron_text.chars().count())
                .help = Some(CRON_HELP.into());
                false
            }
        };
        let timezone = match tz_node {
            None => None,
            Some(n) => {
                let text = self.literal(n, "`timezone`")?;
                match chrono_tz::Tz::from_str(&text) {
                    Ok(tz) => Some(tz),
                    Err(_) => {
                        let help =
                            did_you_mean(&text, chrono_tz::TZ_VARIANTS.iter().map(|t| t.name()))
                                .unwrap_or_else(|| {
                                    "use an IANA name such as Europe/Madrid or UTC".into()
                                });
                        self.error(n.pos, format!("unknown timezone `{text}`"))
                            .set_len(text.chars().count())
                            .help = Some(help);
                        return None;
                    }
                }
            }
        };
        let mut values = Vec::new();
        if let Some(n) = params_node {
            if let Value::Map(entries) = &n.value {
                for (k, v) in entries {
                    let Some(text) = self.literal(v, "a param value") else {
                        continue;
                    };
                    match params.get(k.name.as_str()) {
                        None => {
                            let help = budgeted_did_you_mean(
                                &mut self.suggest_budget,
                                &k.name,
                                params.len(),
                                params.keys().copied(),
                            );
                            self.error(k.pos, format!("unknown param `{}`", k.name))
                                .set_len(k.name.len())
                                .help = help;
                        }
                        Some(p) => {
                            if let Err(msg) = params::check_value(p, &text) {
                                self.error(v.pos, format!("param `{}`: {msg}", k.name))
                                    .set_len(text.chars().count())
                                    .help = (p.kind == ParamKind::Boolean
                                    && is_plain_yaml11_bool(v))
                                .then(|| yaml11_hint(&text));
                            }
                        }
                    }
                    values.push((k.name.clone(), text));
                }
            } else {
                self.type_error(n, "schedule `params`", "a mapping");
            }
        }
        cron_ok.then_some(Schedule {
            cron: cron_text,
            timezone,
            params: values,
        })
    }

    fn steps(&mut self, node: &'n Node, phase: Phase) -> Vec<Step> {
        let key = if phase == Phase::Main {
            "`steps`"
        } else {
            "`finally`"
        };
        let Value::Seq(items) = &node.value else {
            self.type_error(node, key, "a list of steps");
            return Vec::new();
        };
        if items.len() > MAX_STEPS {
            self.error(
                node.pos,
                format!(
                    "{key} has {} steps, more than the limit of {MAX_STEPS}",
                    items.len()
                ),
            );
            return Vec::new();
        }
        if items.is_empty() && phase == Phase::Main {
            self.error(node.pos, "a pipeline needs at least one step in `steps`");
        }
        items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.step(n, phase, i))
            .collect()
    }

    fn step(&mut self, node: &'n Node, phase: Phase, index: usize) -> Option<Step> {
        let what = format!("{} step {}", phase.as_str(), index + 1);
        let f = self.map(node, &format!("a step ({what})"), STEP_KEYS)?;
        let ctx = Ctx::Step {
            phase,
            index,
            condition: false,
        };
        let id = match f.value("id") {
            Some(n) => {
                let id = self.literal(n, "`id`")?;
                if !valid_ident(&id) {
                    self.error(n.pos, format!("step id `{id}` is not valid"))
                        .set_len(id.chars().count())
                        .help = Some(
                        "use letters, digits, `_` and `-`, starting with a letter or `_`".into(),
                    );
                }
                id
            }
            None => match phase {
                Phase::Main => format!("step-{}", index + 1),
                Phase::Finally => format!("finally-{}", index + 1),
            },
        };
        let action = match (f.get("run"), f.get("uses")) {
            (Some(_), Some(_)) => {
                let k = f.key("uses").map_or(node.pos, |k| k.pos);
                self.error(k, "a step has either `run` or `uses`, not both");
                None
            }
            (None, None) => {
                self.error(node.pos, format!("{what} has neither `run` nor `uses`"))
                    .help = Some("add `run: <shell script>` or `uses: <action>`".into());
                None
            }
            (Some(run), None) => {
                if let Some(w) = f.key("with") {
                    self.error(w.pos, "`with` goes with `uses`, not with `run`")
                        .set_len(4);
                }
                self.script(run).map(|script| StepAction::Run { script })
            }
            (None, Some(uses)) => self.uses(uses, f.get("with"), ctx),
        };
        let name = match f.value("name") {
            Some(n) => self.literal(n, "`name`").unwrap_or_default(),
            None => match &action {
                Some(StepAction::Run { script }) => default_name_for_script(script),
                Some(StepAction::Uses { action, .. }) => action.name().to_string(),
                None => id.clone(),
            },
        };
        let condition = f.get("if").and_then(|n| {
            self.condition(
                n,
                Ctx::Step {
                    phase,
                    index,
                    condition: true,
                },
            )
        });
        let env = f
            .value("env")
            .map(|n| self.env(n, "step `env`", ctx))
            .unwrap_or_default();
        let timeout = f
            .value("timeout")
            .and_then(|n| self.duration(n, "`timeout`"));
        let retry = f
            .value("retry")
            .and_then(|n| self.retry(n))
            .unwrap_or_default();
        let continue_on_error = f
            .value("continue_on_error")
            .and_then(|n| self.bool(n, "`continue_on_error`"))
            .unwrap_or(false);
        let working_directory = f
            .value("working_directory")
            .and_then(|n| self.working_directory(n));
        Some(Step {
            id,
            name,
            phase,
            condition,
            env,
            timeout,
            retry,
            continue_on_error,
            working_directory,
            action: action?,
        })
    }

    /// A folder inside the run's workspace, fixed when the file is loaded.
    fn working_directory(&mut self, node: &Node) -> Option<String> {
        let what = "`working_directory`";
        let help = "write a path relative to the run's workspace, such as `sub/dir`";
        let text = self.string(node, what)?;
        if let Some(k) = text.find("${{") {
            let pos = node.pos_in_scalar(&self.lines, k, "${{");
            self.error(
                pos,
                format!("{what} cannot hold an expression: it is a fixed path, checked when the file is loaded, so that no value given to a run can point a step outside its workspace"),
            )
            .set_len(3)
            .help = Some(format!("{help}; a script that must choose its folder at run time can `cd`"));
            return None;
        }
        let path = std::path::Path::new(&text);
        let problem = if text.trim().is_empty() {
            format!("{what} is empty")
        } else if path.has_root() {
            format!("{what} must be inside the run's workspace, not the absolute path `{text}`")
        } else if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            format!("{what} cannot use `..`: the folder must stay inside the run's workspace")
        } else {
            return Some(text);
        };
        self.error(node.pos, problem)
            .set_len(text.chars().count())
            .help = Some(help.into());
        None
    }

    fn script(&mut self, node: &'n Node) -> Option<String> {
        let script = self.string(node, "`run`")?;
        if script.trim().is_empty() {
            self.error(node.pos, "`run` is empty");
            return None;
        }
        match expr::find_expressions(&script) {
            Err(_) => {}
            Ok(found) => {
                for f in found {
                    let pos = node.pos_in_scalar(&self.lines, f.start, "${{");
                    let help = expr::parse(f.inner)
                        .ok()
                        .map(|e| env_form(&e))
                        .unwrap_or_else(|| {
                            "pass the value through the step's `env:` and use the variable".into()
                        });
                    self.error(pos, "`${{ ... }}` is not expanded inside `run:`, so untrusted text never becomes shell code")
                        .set_len(f.end - f.start)
                        .help = Some(help);
                }
            }
        }
        Some(script)
    }

    fn uses(&mut self, node: &'n Node, with: Option<&'n Node>, ctx: Ctx) -> Option<StepAction> {
        let name = self.literal(node, "`uses`")?;
        let Some(spec) = actions::find(&name) else {
            let help = did_you_mean(&name, actions::ACTIONS.iter().map(|a| a.name()))
                .unwrap_or_else(|| {
                    format!(
                        "built-in actions: {}",
                        actions::ACTIONS
                            .iter()
                            .map(|a| a.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
            self.error(node.pos, format!("unknown action `{name}`"))
                .set_len(name.chars().count())
                .help = Some(help);
            return None;
        };
        let value = match with {
            None => WithValue::Map(Vec::new()),
            Some(w) if w.is_null() => WithValue::Map(Vec::new()),
            Some(
                w @ Node {
                    value: Value::Map(_),
                    ..
                },
            ) => self.with_value(w, "`with`", ctx)?,
            Some(w) => {
                self.type_error(w, "`with`", "a mapping");
                return None;
            }
        };
        // The action's own `With` struct decides: the same code checks the evaluated values
        // when the step runs.
        let errors = spec.check(&value.to_checked_json());
        for e in &errors {
            self.with_error(spec, node, with, e);
        }
        errors.is_empty().then_some(StepAction::Uses {
            action: spec,
            with: value,
        })
    }

    /// A `with` value as written, its expressions parsed (and their references noted).
    fn with_value(&mut self, node: &'n Node, what: &str, ctx: Ctx) -> Option<WithValue> {
        Some(match &node.value {
            Value::Seq(items) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match self.with_value(item, &format!("{what}[{i}]"), ctx) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                }
                ok.then_some(WithValue::List(out))?
            }
            Value::Map(entries) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (k, v) in entries {
                    let inner = format!("{}.{}`", what.trim_end_matches('`'), k.name);
                    match self.with_value(v, &inner, ctx) {
                        Some(v) => out.push((k.name.clone(), v)),
                        None => ok = false,
                    }
                }
                ok.then_some(WithValue::Map(out))?
            }
            Value::Scalar { text, style } => {
                if *style == Style::Plain {
                    if node.is_null() {
                        return Some(WithValue::Lit(serde_json::Value::Null));
                    }
                    if let Ok(b) = text.parse::<bool>() {
                        return Some(WithValue::Lit(serde_json::Value::Bool(b)));
                    }
                    if let Ok(n) = serde_json::from_str::<serde_json::Number>(text) {
                        return Some(WithValue::Lit(serde_json::Value::Number(n)));
                    }
                }
                let t = self.template(node, what, ctx)?;
                if t.is_literal() {
                    WithValue::Lit(serde_json::Value::String(text.clone()))
                } else {
                    WithValue::Template(t)
                }
            }
        })
    }

    /// Reports a problem the action's `With` found, at the value it is about.
    fn with_error(
        &mut self,
        spec: &dyn actions::Spec,
        uses: &Node,
        with: Option<&'n Node>,
        e: &actions::WithError,
    ) {
        let field = e.dotted();
        if let Some(missing) = e.message.strip_prefix("missing field `") {
            let missing = missing.split('`').next().unwrap_or_default();
            let at = with_node(with, &e.path).unwrap_or(uses);
            let parent = field.trim_start_matches("with");
            self.error(
                at.pos,
                format!("`{}` needs `with{parent}.{missing}`", spec.name()),
            );
            return;
        }
        if let Some(name) = actions::unknown_field(&e.message) {
            let key = with_key(with, &e.path);
            let expected: Vec<&str> = e
                .message
                .split("expected ")
                .nth(1)
                .unwrap_or_default()
                .split('`')
                .skip(1)
                .step_by(2)
                .collect();
            let help = did_you_mean(name, expected.iter().copied()).unwrap_or_else(|| {
                if expected.is_empty() {
                    format!("`{field}` takes no fields")
                } else {
                    format!("it takes: {}", expected.join(", "))
                }
            });
            let parent = field
                .rsplit_once('.')
                .map_or("with", |(p, _)| p)
                .to_string();
            let pos = key.map_or(uses.pos, |k| k.pos);
            let what = if parent == "with" {
                format!("`{}`", spec.name())
            } else {
                format!("`{parent}`")
            };
            self.error(pos, format!("unknown field `{name}` for {what}"))
                .set_len(name.chars().count())
                .help = Some(help);
            return;
        }
        let at = with_node(with, &e.path).unwrap_or(uses);
        let message = humane(&e.message);
        let len = at.as_scalar().map(|(t, _)| t.chars().count());
        let d = self.error(at.pos, format!("`{field}`: {message}"));
        if let Some(len) = len.filter(|l| *l > 0) {
            d.set_len(len);
        }
    }

    fn condition(&mut self, node: &'n Node, ctx: Ctx) -> Option<Condition> {
        let (text, style) = match node.as_scalar() {
            Some(s) if !node.is_null() => s,
            _ => {
                self.type_error(node, "`if`", "an expression");
                return None;
            }
        };
        if style == Style::Plain && matches!(text, "true" | "false") {
            return Some(Condition {
                expr: Expr::Lit(expr::Value::Bool(text == "true")),
                text: text.into(),
            });
        }
        if style == Style::Plain && is_yaml11_bool(text) {
            self.error(
                node.pos,
                format!("`if` must be a condition, found `{text}`"),
            )
            .set_len(text.chars().count())
            .help = Some(yaml11_hint(text));
            return None;
        }
        let trimmed = text.trim();
        let lead = text.len() - text.trim_start().len();
        let (inner, offset, base) = if trimmed.starts_with("${{") {
            let found = match expr::find_expressions(text) {
                Ok(found) => found,
                Err(e) => {
                    self.expr_error(node, 0, e);
                    return None;
                }
            };
            match found.as_slice() {
                [f] if f.start == lead && f.end == lead + trimmed.len() => {
                    (f.inner, f.start, f.inner_start)
                }
                _ => {
                    self.error(node.pos, "`if` must be one expression").help =
                        Some("write the whole condition inside one `${{ ... }}`".into());
                    return None;
                }
            }
        } else {
            (text, 0, 0)
        };
        match expr::parse(inner) {
            // A constant other than true or false decides nothing: `if: 42` would always run
            // the step and `if: 0` never, whatever the run does. It is a mistake, not a choice.
            Ok(Expr::Lit(value)) if !matches!(value, expr::Value::Bool(_)) => {
                let found = match &value {
                    expr::Value::Null => "null".to_string(),
                    expr::Value::Number(_) => format!("the number `{value}`"),
                    expr::Value::String(s) => format!("the string '{}'", truncate(s, 40)),
                    expr::Value::Bool(_) => value.to_string(),
                };
                let needle = inner.trim();
                let at = base + (inner.len() - inner.trim_start().len());
                let pos = node.pos_in_scalar(&self.lines, at, needle);
                self.error(
                    pos,
                    format!("`if` must be a condition, found {found}"),
                )
                .set_len(needle.chars().count())
                .help = Some(
                    "a constant other than true or false decides nothing; compare a value instead, as in `params.deploy == 'yes'`".into(),
                );
                None
            }
            Ok(e) => {
                self.sites.push(Site {
                    node,
                    offset,
                    expr: e.clone(),
                    ctx,
                });
                Some(Condition {
                    expr: e,
                    text: inner.trim().to_string(),
                })
            }
            Err(e) => {
                self.expr_error(node, base, e);
                None
            }
        }
    }

    fn retry(&mut self, node: &'n Node) -> Option<Retry> {
        if node.as_scalar().is_some() {
            let count = self.uint(node, "`retry`", MAX_RETRIES)?;
            return Some(Retry {
                count,
                backoff: std::time::Duration::from_secs(1),
            });
        }
        let f = self.map(node, "`retry`", RETRY_KEYS)?;
        let count = match f.value("count") {
            Some(n) => self.uint(n, "`retry.count`", MAX_RETRIES)?,
            None => {
                self.error(node.pos, "`retry` needs `count`");
                return None;
            }
        };
        let backoff = match f.value("backoff") {
            Some(n) => self.duration(n, "`retry.backoff`")?,
            None => std::time::Duration::from_secs(1),
        };
        Some(Retry { count, backoff })
    }

    fn check_step_ids(&mut self, steps: &[Step], finally: &[Step], top: &Fields<'n>) {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut env_keys: HashSet<String> = HashSet::new();
        for step in steps.iter().chain(finally) {
            if !seen.insert(&step.id) {
                // Find the id's node for the position: the second occurrence in the file.
                let pos = find_id_pos(top, &step.id).unwrap_or(Pos::new(1, 1));
                self.error(pos, format!("duplicate step id `{}`", step.id))
                    .set_len(step.id.chars().count());
            } else if !env_keys.insert(env_key(&step.id)) {
                let pos = find_id_pos(top, &step.id).unwrap_or(Pos::new(1, 1));
                self.error(
                    pos,
                    format!(
                        "step id `{}` would share its SKIFF_STEP_ variables with another step",
                        step.id
                    ),
                );
            }
        }
    }

    /// Pass 2: what an expression refers to must exist and be visible from where it stands.
    fn check_refs(&mut self, refs: &mut Refs<'_>, site: &Site<'n>) {
        let mut problems: Vec<(usize, usize, String, Option<String>)> = Vec::new();
        expr::walk(&site.expr, &mut |e| match e {
            Expr::Ref { path, start, end } => {
                if let Err((msg, help)) = refs.check(site.ctx, path) {
                    problems.push((*start, *end - *start, msg, help));
                }
            }
            Expr::Call {
                name,
                args,
                start,
                end,
            } => {
                let status_fn = expr::is_status_function(name);
                match expr::FUNCTIONS.iter().find(|(n, _, _)| n == name) {
                    None => {
                        let help = did_you_mean(name, expr::FUNCTIONS.iter().map(|(n, _, _)| *n));
                        problems.push((
                            *start,
                            name.len(),
                            format!("unknown function `{name}`"),
                            help,
                        ));
                    }
                    Some((_, min, max)) if args.len() < *min || args.len() > *max => {
                        let want = if min == max {
                            format!("{min}")
                        } else {
                            format!("{min} to {max}")
                        };
                        problems.push((
                            *start,
                            *end - *start,
                            format!("`{name}` takes {want} arguments, given {}", args.len()),
                            None,
                        ));
                    }
                    Some(_)
                        if status_fn
                            && !matches!(
                                site.ctx,
                                Ctx::Step {
                                    condition: true,
                                    ..
                                }
                            ) =>
                    {
                        problems.push((
                            *start,
                            *end - *start,
                            format!("`{name}()` can only be used in a step's `if`"),
                            None,
                        ));
                    }
                    Some(_) => {}
                }
            }
            _ => {}
        });
        let text = site.node.as_scalar().map(|(t, _)| t).unwrap_or("");
        // Offsets in the Expr are relative to the expression's inner text.
        let inner_base = if text[site.offset..].starts_with("${{") {
            site.offset + 3
        } else {
            site.offset
        };
        for (start, len, msg, help) in problems {
            self.expr_error(
                site.node,
                inner_base,
                ExprError {
                    start,
                    len,
                    message: msg,
                    help,
                },
            );
        }
    }
}

/// How many names a "declared: ..." help lists.
const LISTED: usize = 10;

/// Up to `LISTED` names, then how many there are in all.
fn list_some<'a>(names: impl Iterator<Item = &'a str>, total: usize) -> String {
    let shown: Vec<&str> = names.take(LISTED).collect();
    if total > shown.len() {
        format!("{}, … ({total} in all)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The reference pass's view of a loaded pipeline: what references may name, indexed once so
/// that each lookup takes constant time, and a budget for typo suggestions (each compares a word
/// with every candidate), so that a file with thousands of bad references and thousands of names
/// is still checked in milliseconds.
struct Refs<'p> {
    p: &'p Pipeline,
    params: HashSet<&'p str>,
    env: HashSet<&'p str>,
    /// Each step's own `env:` names, by phase and index.
    main_env: Vec<HashSet<&'p str>>,
    finally_env: Vec<HashSet<&'p str>>,
    /// Each step id, and where the step stands (the first one, for a duplicated id).
    steps: HashMap<&'p str, (Phase, usize)>,
    /// Candidate comparisons left for suggestions.
    suggest_budget: usize,
}

impl<'p> Refs<'p> {
    fn new(p: &'p Pipeline) -> Self {
        let env_of = |steps: &'p [Step]| -> Vec<HashSet<&'p str>> {
            steps
                .iter()
                .map(|s| s.env.iter().map(|e| e.name.as_str()).collect())
                .collect()
        };
        let mut steps = HashMap::new();
        for (phase, list) in [(Phase::Main, &p.steps), (Phase::Finally, &p.finally)] {
            for (i, s) in list.iter().enumerate() {
                steps.entry(s.id.as_str()).or_insert((phase, i));
            }
        }
        Refs {
            p,
            params: p.params.iter().map(|p| p.name.as_str()).collect(),
            env: p.env.iter().map(|e| e.name.as_str()).collect(),
            main_env: env_of(&p.steps),
            finally_env: env_of(&p.finally),
            steps,
            suggest_budget: SUGGEST_BUDGET,
        }
    }

    fn did_you_mean<'a>(
        &mut self,
        word: &str,
        n: usize,
        candidates: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        budgeted_did_you_mean(&mut self.suggest_budget, word, n, candidates)
    }

    fn check(&mut self, ctx: Ctx, path: &[String]) -> Result<(), (String, Option<String>)> {
        let p = self.p;
        let root = path[0].as_str();
        let full = path.join(".");
        let want = |n: usize, form: &str| -> Result<(), (String, Option<String>)> {
            if path.len() == n {
                Ok(())
            } else {
                Err((
                    format!("`{full}` is not a valid reference"),
                    Some(format!("write {form}")),
                ))
            }
        };
        if ctx == Ctx::WebhookSecret && root != "secrets" {
            return Err((
                format!("`{full}`: a webhook secret can only refer to `secrets`"),
                None,
            ));
        }
        match root {
            "params" => {
                want(2, "`params.NAME`")?;
                if !self.params.contains(path[1].as_str()) {
                    let names = p.params.iter().map(|p| p.name.as_str());
                    let help = self
                        .did_you_mean(&path[1], p.params.len(), names.clone())
                        .unwrap_or_else(|| {
                            if p.params.is_empty() {
                                "this pipeline declares no params".into()
                            } else {
                                format!("declared params: {}", list_some(names, p.params.len()))
                            }
                        });
                    return Err((format!("unknown param `{}`", path[1]), Some(help)));
                }
            }
            "secrets" => {
                want(2, "`secrets.NAME`")?;
                if !valid_env_name(&path[1]) {
                    return Err((
                        format!("`{}` is not a valid secret name", path[1]),
                        Some("use letters, digits and `_`".into()),
                    ));
                }
            }
            "env" => {
                want(2, "`env.NAME`")?;
                let (step_env, step_names) = match ctx {
                    Ctx::Step { phase, index, .. } => (
                        step_at(p, phase, index).map_or(&[][..], |s| s.env.as_slice()),
                        match phase {
                            Phase::Main => self.main_env.get(index),
                            Phase::Finally => self.finally_env.get(index),
                        },
                    ),
                    _ => (&[][..], None),
                };
                let name = path[1].as_str();
                if !self.env.contains(name) && !step_names.is_some_and(|s| s.contains(name)) {
                    let names = p.env.iter().chain(step_env).map(|e| e.name.as_str());
                    let help = self
                        .did_you_mean(name, p.env.len() + step_env.len(), names)
                        .unwrap_or_else(|| {
                            "`env.NAME` refers to variables set in an `env:` of this file".into()
                        });
                    return Err((format!("unknown env `{name}`"), Some(help)));
                }
            }
            "run" => {
                want(2, "`run.FIELD`")?;
                if !RUN_FIELDS.contains(&path[1].as_str()) {
                    let help = did_you_mean(&path[1], RUN_FIELDS.iter().copied())
                        .unwrap_or_else(|| format!("run has: {}", RUN_FIELDS.join(", ")));
                    return Err((format!("unknown field `run.{}`", path[1]), Some(help)));
                }
            }
            "steps" => {
                let Ctx::Step { phase, index, .. } = ctx else {
                    return Err((
                        format!("`{full}`: steps can only be referred to from a step"),
                        None,
                    ));
                };
                if path.len() < 3 {
                    return Err((
                        format!("`{full}` is not a valid reference"),
                        Some("write `steps.ID.outputs.NAME` or `steps.ID.status`".into()),
                    ));
                }
                // A main step sees the main steps before it; a `finally` step sees every main
                // step and the `finally` steps before it.
                let found = self.steps.get(path[1].as_str()).copied();
                let visible = |(at_phase, at): (Phase, usize)| match (phase, at_phase) {
                    (_, Phase::Main) if phase == Phase::Finally => true,
                    (Phase::Main, Phase::Main) | (Phase::Finally, Phase::Finally) => at < index,
                    _ => false,
                };
                let Some(step) = found
                    .filter(|&f| visible(f))
                    .and_then(|(at_phase, at)| step_at(p, at_phase, at))
                else {
                    if found.is_some() {
                        return Err((
                            format!("step `{}` has not run yet at this point", path[1]),
                            Some("a step can only use steps before it".into()),
                        ));
                    }
                    let (n, before): (usize, Vec<&Step>) = match phase {
                        Phase::Main => (index, p.steps.iter().take(index).collect()),
                        Phase::Finally => (
                            p.steps.len() + index,
                            p.steps.iter().chain(p.finally.iter().take(index)).collect(),
                        ),
                    };
                    let help = self.did_you_mean(&path[1], n, before.iter().map(|s| s.id.as_str()));
                    return Err((format!("unknown step `{}`", path[1]), help));
                };
                match (path[2].as_str(), path.len()) {
                    ("status", 3) => {}
                    ("outputs", 4) => {
                        if let StepAction::Uses { action, .. } = &step.action
                            && !action.outputs().contains(&path[3].as_str())
                        {
                            let help = did_you_mean(&path[3], action.outputs().iter().copied())
                                .unwrap_or_else(|| {
                                    format!(
                                        "`{}` outputs: {}",
                                        action.name(),
                                        action.outputs().join(", ")
                                    )
                                });
                            return Err((
                                format!("`{}` has no output `{}`", action.name(), path[3]),
                                Some(help),
                            ));
                        }
                    }
                    _ => {
                        return Err((
                            format!("`{full}` is not a valid reference"),
                            Some("write `steps.ID.outputs.NAME` or `steps.ID.status`".into()),
                        ));
                    }
                }
            }
            other => {
                let help = did_you_mean(other, ROOTS.iter().copied())
                    .unwrap_or_else(|| format!("expressions can use: {}", ROOTS.join(", ")));
                return Err((format!("unknown name `{other}`"), Some(help)));
            }
        }
        Ok(())
    }
}

fn step_at(p: &Pipeline, phase: Phase, index: usize) -> Option<&Step> {
    match phase {
        Phase::Main => p.steps.get(index),
        Phase::Finally => p.finally.get(index),
    }
}

/// The position of the second step with this id (the one that duplicates).
fn find_id_pos(top: &Fields<'_>, id: &str) -> Option<Pos> {
    let mut hits = ["steps", "finally"]
        .iter()
        .filter_map(|k| top.value(k))
        .filter_map(|n| match &n.value {
            Value::Seq(items) => Some(items),
            _ => None,
        })
        .flatten()
        .filter_map(|step| match &step.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == "id").map(|(_, v)| v),
            _ => None,
        })
        .filter(|v| v.as_scalar().is_some_and(|(t, _)| t == id))
        .map(|v| v.pos);
    hits.next();
    hits.next()
}

/// How to get an expression's value into a script without splicing it into the script text.
fn env_form(e: &Expr) -> String {
    let simple = match e {
        Expr::Ref { path, .. } => match path
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["params", name] => Some(format!("SKIFF_PARAM_{}", env_key(name))),
            ["steps", id, "outputs", out] => {
                Some(format!("SKIFF_STEP_{}_{}", env_key(id), env_key(out)))
            }
            ["env", name] => Some((*name).to_string()),
            ["run", "id"] => Some("SKIFF_RUN_ID".into()),
            ["run", "number"] => Some("SKIFF_RUN_NUMBER".into()),
            ["run", "pipeline"] => Some("SKIFF_PIPELINE".into()),
            ["run", "trigger"] => Some("SKIFF_TRIGGER".into()),
            ["secrets", name] => {
                return format!(
                    "map the secret in the step's `env:` (`{name}: ${{{{ secrets.{name} }}}}`) and use \"${name}\" in the script"
                );
            }
            _ => None,
        },
        _ => None,
    };
    match simple {
        Some(var) => format!("use the environment variable instead: \"${var}\""),
        None => {
            "set it in the step's `env:` (`VALUE: ${{ ... }}`) and use \"$VALUE\" in the script"
                .into()
        }
    }
}

fn default_name_for_script(script: &str) -> String {
    let first = script
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("run");
    truncate(first, 60)
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

const CRON_HELP: &str = "minute hour day-of-month month day-of-week, e.g. `0 2 * * *`; six fields put seconds first, e.g. `30 0 2 * * *`; or @daily, @hourly...";

const CRON_NICKNAMES: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

fn check_cron(text: &str) -> Result<(), String> {
    let trimmed = text.trim();
    if trimmed.starts_with('@') && !CRON_NICKNAMES.contains(&trimmed) {
        let hint = did_you_mean(trimmed, CRON_NICKNAMES.iter().copied())
            .unwrap_or_else(|| format!("known: {}", CRON_NICKNAMES.join(", ")));
        return Err(format!("unknown nickname; {hint}"));
    }
    let fields = text.split_whitespace().count();
    if !text.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
        return Err(format!(
            "it has {fields} fields; a cron line has 5, or 6 with seconds first"
        ));
    }
    croner::Cron::from_str(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The node at `path` inside `with`.
fn with_node<'n>(with: Option<&'n Node>, path: &[actions::PathSeg]) -> Option<&'n Node> {
    let mut at = with?;
    for seg in path {
        at = match (seg, &at.value) {
            (actions::PathSeg::Key(k), Value::Map(entries)) => {
                &entries.iter().find(|(key, _)| &key.name == k)?.1
            }
            (actions::PathSeg::Index(i), Value::Seq(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// The key that ends `path` inside `with` (for an unknown field).
fn with_key<'n>(with: Option<&'n Node>, path: &[actions::PathSeg]) -> Option<&'n Key> {
    let (last, parent) = path.split_last()?;
    let actions::PathSeg::Key(name) = last else {
        return None;
    };
    match &with_node(with, parent)?.value {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| &k.name == name)
            .map(|(k, _)| k),
        _ => None,
    }
}

/// serde's "invalid type: string \"ok\", expected i64" in the loader's words.
fn humane(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_string();
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected {
        "i64" | "u64" | "u32" | "u16" | "u8" | "i32" | "usize" => "a whole number",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        other => other,
    };
    let found = match found.split_once(' ') {
        Some(("string", text)) => format!("`{}`", text.trim_matches('"')),
        Some(("integer" | "floating", _)) => found.to_string(),
        _ => found.to_string(),
    };
    format!("must be {expected}, found {found}")
}
