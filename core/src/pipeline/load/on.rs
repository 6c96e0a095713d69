//! Params and triggers (`on:`): manual, webhooks, schedules and their cron lines.

use std::collections::HashMap;

use super::*;

impl<'s, 'n> Cx<'s, 'n> {
    pub(super) fn params(&mut self, node: &'n Node) -> Vec<Param> {
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

    pub(super) fn param(&mut self, name: &str, node: &'n Node) -> Option<Param> {
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

    pub(super) fn triggers(&mut self, node: &'n Node, params: &[Param], name: &str) -> Triggers {
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
            t.webhook = self.webhook(n, params, name);
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

    pub(super) fn webhook(
        &mut self,
        node: &'n Node,
        params: &[Param],
        pipeline: &str,
    ) -> Option<Webhook> {
        let f = self.map(node, "`on.webhook`", WEBHOOK_KEYS)?;
        let mut hook_ok = true;
        let hook = match f.value("hook") {
            None => pipeline.to_string(),
            Some(n) => {
                let text = self.literal(n, "`on.webhook.hook`").unwrap_or_default();
                if !valid_name(&text) {
                    hook_ok = false;
                    self.error(n.pos, format!("hook id `{text}` is not valid"))
                        .set_len(text.chars().count())
                        .help = Some(
                        "use letters, digits, `-`, `_` and `.`, starting with a letter or digit"
                            .into(),
                    );
                }
                text
            }
        };
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
                let name = t.as_ref().and_then(|t| match t.parts.as_slice() {
                    [expr::Part::Expr(Expr::Ref { path, .. }, _)]
                        if path.len() == 2 && path[0] == "secrets" =>
                    {
                        Some(path[1].clone())
                    }
                    _ => None,
                });
                if t.is_some() && name.is_none() {
                    self.error(n.pos, "`on.webhook.secret` must be a secret reference, not text in the file")
                        .help = Some("write `secret: ${{ secrets.HOOK_SECRET }}` and provide SKIFF_SECRET_HOOK_SECRET".into());
                }
                t.zip(name).map(|(t, name)| (t, name, n.pos))
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
                    if e == "ping" {
                        self.error(i.pos, "`ping` never starts a run")
                            .set_len(e.len())
                            .help = Some("a verified ping is answered 200 by skiff itself; drop it from `events`".into());
                    } else if !WEBHOOK_EVENTS.contains(&e.as_str()) {
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
        let mut globs = |key: &str, what: &str| -> Vec<String> {
            let Some(n) = f.value(key) else {
                return Vec::new();
            };
            let list = self.string_list(n, what);
            for g in &list {
                if let Err(msg) = crate::glob::check(g) {
                    self.error(n.pos, format!("{what} `{g}`: {msg}")).help = Some(
                        "`*` matches within a path segment, `**` across `/`, `!` in front excludes"
                            .into(),
                    );
                }
            }
            list
        };
        let branches = globs("branches", "a branch pattern");
        let tags = globs("tags", "a tag pattern");
        let paths = globs("paths", "a path pattern");
        let condition = f.get("if").and_then(|n| self.condition(n, Ctx::Webhook));
        let mut values = Vec::new();
        if let Some(n) = f.value("params") {
            if let Value::Map(entries) = &n.value {
                let declared: HashMap<&str, &Param> =
                    params.iter().map(|p| (p.name.as_str(), p)).collect();
                for (k, v) in entries {
                    if !declared.contains_key(k.name.as_str()) {
                        let help = budgeted_did_you_mean(
                            &mut self.suggest_budget,
                            &k.name,
                            declared.len(),
                            declared.keys().copied(),
                        )
                        .or_else(|| Some("declare it under `params:` first".into()));
                        self.error(k.pos, format!("unknown param `{}`", k.name))
                            .set_len(k.name.len())
                            .help = help;
                        continue;
                    }
                    if let Some(t) = self.template(v, &format!("param `{}`", k.name), Ctx::Webhook)
                    {
                        values.push((k.name.clone(), t));
                    }
                }
            } else {
                self.type_error(n, "`on.webhook.params`", "a mapping of param: value");
            }
        }
        let (secret, secret_name, secret_pos) = secret.filter(|_| hook_ok)?;
        Some(Webhook {
            hook,
            secret,
            secret_name,
            secret_pos,
            events,
            branches,
            tags,
            paths,
            condition,
            params: values,
        })
    }

    pub(super) fn schedule(
        &mut self,
        node: &'n Node,
        params: &HashMap<&str, &Param>,
    ) -> Option<Schedule> {
        let (cron_node, tz_node, missed_node, params_node) = match &node.value {
            Value::Scalar { .. } => (node, None, None, None),
            _ => {
                let f = self.map(node, "a schedule", SCHEDULE_KEYS)?;
                let Some(c) = f.value("cron") else {
                    self.error(node.pos, "a schedule needs `cron`").help =
                        Some("for example `cron: \"0 2 * * *\"`".into());
                    return None;
                };
                (c, f.value("timezone"), f.value("missed"), f.value("params"))
            }
        };
        let cron_text = self.literal(cron_node, "`cron`")?;
        let line = match check_cron(&cron_text) {
            Ok(line) => Some(line),
            Err(msg) => {
                self.error(
                    cron_node.pos,
                    format!("bad cron expression `{cron_text}`: {msg}"),
                )
                .set_len(cron_text.chars().count())
                .help = Some(CRON_HELP.into());
                None
            }
        };
        let mut missed = Missed::Skip;
        if let Some(n) = missed_node {
            let text = self.literal(n, "`missed`")?;
            match text.as_str() {
                "skip" => missed = Missed::Skip,
                "once" => missed = Missed::Once,
                _ => {
                    self.error(n.pos, format!("unknown `missed` policy `{text}`"))
                        .set_len(text.chars().count())
                        .help = Some(
                        "`skip` (the default: slots missed while skiff was down are gone) or `once` (one run for the latest missed slot)".into(),
                    );
                }
            }
        }
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
        Some(Schedule {
            cron: cron_text,
            line: line?,
            timezone,
            missed,
            params: values,
        })
    }
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

fn check_cron(text: &str) -> Result<croner::Cron, String> {
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
    croner::Cron::from_str(text).map_err(|e| e.to_string())
}
