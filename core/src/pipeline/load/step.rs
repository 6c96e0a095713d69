//! Steps: their keys, scripts, actions and their `with`, conditions, retries.

use super::refs::env_form;

use super::*;

impl<'s, 'n> Cx<'s, 'n> {
    pub(super) fn steps(&mut self, node: &'n Node, phase: Phase) -> Vec<Step> {
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

    pub(super) fn step(&mut self, node: &'n Node, phase: Phase, index: usize) -> Option<Step> {
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
    pub(super) fn working_directory(&mut self, node: &Node) -> Option<String> {
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

    pub(super) fn script(&mut self, node: &'n Node) -> Option<String> {
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

    pub(super) fn uses(
        &mut self,
        node: &'n Node,
        with: Option<&'n Node>,
        ctx: Ctx,
    ) -> Option<StepAction> {
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
        if errors.is_empty() && !self.registry_declared(spec, with) {
            return None;
        }
        errors.is_empty().then_some(StepAction::Uses {
            action: spec,
            with: value,
        })
    }

    /// A `with` value as written, its expressions parsed (and their references noted).
    pub(super) fn with_value(&mut self, node: &'n Node, what: &str, ctx: Ctx) -> Option<WithValue> {
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
    pub(super) fn with_error(
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

    pub(super) fn condition(&mut self, node: &'n Node, ctx: Ctx) -> Option<Condition> {
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

    pub(super) fn retry(&mut self, node: &'n Node) -> Option<Retry> {
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
}

fn default_name_for_script(script: &str) -> String {
    let first = script
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("run");
    truncate(first, 60)
}

/// The node at `path` inside `with`.
impl Cx<'_, '_> {
    /// `docker/push`'s `with.registry`, written as a name, must be one skiff's config declares
    /// (when the loader is told which); false, with the error recorded, when it is not.
    fn registry_declared(&mut self, spec: &dyn actions::Spec, with: Option<&Node>) -> bool {
        let Some(declared) = self.registries else {
            return true;
        };
        if spec.name() != <actions::docker::Push as actions::ActionDef>::NAME {
            return true;
        }
        let Some(node) = with_node(with, &[actions::PathSeg::Key("registry".into())]) else {
            return true;
        };
        let Value::Scalar { text, .. } = &node.value else {
            return true;
        };
        if text.contains("${{") || declared.iter().any(|r| r == text) {
            return true;
        }
        let names = if declared.is_empty() {
            "none: see [[registry]] in skiff.toml".to_string()
        } else {
            declared.join(", ")
        };
        self.error(
            node.pos,
            format!("registry `{text}` is not declared in skiff's config (declared: {names})"),
        )
        .set_len(text.chars().count());
        false
    }
}

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
