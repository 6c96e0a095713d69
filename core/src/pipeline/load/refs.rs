//! Pass 2: what expressions refer to (params, env, secrets, steps and their outputs, run
//! fields), once every step id is known; duplicate step ids.

use std::collections::{HashMap, HashSet};

use super::*;

impl<'s, 'n> Cx<'s, 'n> {
    pub(super) fn check_step_ids(&mut self, steps: &[Step], finally: &[Step], top: &Fields<'n>) {
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
    pub(super) fn check_refs(&mut self, refs: &mut Refs<'_>, site: &Site<'n>) {
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
pub(super) struct Refs<'p> {
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
    /// The secrets the steps and env refer to.
    secrets: std::collections::BTreeSet<String>,
}

impl<'p> Refs<'p> {
    pub(super) fn new(p: &'p Pipeline) -> Self {
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
            secrets: Default::default(),
        }
    }

    /// The secrets the pipeline's steps and env referred to, sorted.
    pub(super) fn secrets(self) -> Vec<String> {
        self.secrets.into_iter().collect()
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
        if ctx == Ctx::Webhook && root != "event" {
            return Err((
                format!("`{full}`: `on.webhook.params` and `on.webhook.if` can only use `event`"),
                Some(format!(
                    "for example `event.branch`; fields: {}",
                    EVENT_FIELDS.join(", ")
                )),
            ));
        }
        match root {
            "event" => {
                if ctx != Ctx::Webhook {
                    return Err((
                        format!("`{full}`: `event` is only known in `on.webhook.params` and `on.webhook.if`"),
                        Some("map what a step needs to a param: `on: { webhook: { params: { sha: \"${{ event.sha }}\" } } }`, then use `params.sha`".into()),
                    ));
                }
                let field = path.get(1).map(String::as_str);
                match field {
                    Some("payload") => {}
                    Some(f) if EVENT_FIELDS.contains(&f) => want(2, "`event.FIELD`")?,
                    _ => {
                        let help = field
                            .and_then(|f| did_you_mean(f, EVENT_FIELDS.iter().copied()))
                            .unwrap_or_else(|| format!("event has: {}", EVENT_FIELDS.join(", ")));
                        return Err((format!("`{full}` is not a field of the event"), Some(help)));
                    }
                }
            }
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
                if ctx != Ctx::WebhookSecret {
                    self.secrets.insert(path[1].clone());
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
pub(super) fn env_form(e: &Expr) -> String {
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
