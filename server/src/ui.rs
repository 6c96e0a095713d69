//! The web UI: server-rendered pages (askama templates from `web/templates`), plain forms with
//! CSRF tokens, and a little JS for live logs.

use std::collections::BTreeMap;

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use rust_embed::RustEmbed;
use serde::Deserialize;
use skiff_core::catalog::Entry;
use skiff_core::diag::Report;
use skiff_core::dispatch::DispatchError;
use skiff_core::duration::human;
use skiff_core::pipeline::ParamError;
use skiff_core::run::{Run, StepRecord, TriggerKind};
use skiff_core::store::{ApiToken, RunQuery};

use crate::AppState;
use crate::api::{load_run, trigger_of};
use crate::auth::{self, Principal, constant_time_eq, hash_secret, identify};
use crate::error::ApiError;

#[derive(RustEmbed)]
#[folder = "../web/static/"]
struct Static;

/// The tab's icon, also where browsers look for it without being told.
pub async fn favicon() -> Response {
    static_file(Path("favicon.svg".to_string())).await
}

pub async fn static_file(Path(path): Path<String>) -> Response {
    match Static::get(&path) {
        Some(file) => (
            [
                (header::CONTENT_TYPE, file.metadata.mimetype().to_string()),
                (header::CACHE_CONTROL, "public, max-age=300".to_string()),
            ],
            file.data,
        )
            .into_response(),
        None => ApiError::not_found(format!("no static file {path}")).into_response(),
    }
}

/// A signed-in UI user; anyone else is sent to the login page.
pub struct Page {
    csrf: String,
    principal: Principal,
}

/// Sent to sign in; a page that was asked for (a GET) is where signing in lands.
pub struct ToLogin(Option<String>);

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        match self.0.as_deref().map(safe_next) {
            Some(next) if next != "/" => {
                Redirect::to(&format!("/login?next={}", crate::web::encode(next))).into_response()
            }
            _ => Redirect::to("/login").into_response(),
        }
    }
}

/// Where signing in may lead: a path on this server (one `/`, then no `/` or `\`, visible
/// ASCII only: what a Location header carries as it is); anything else is the dashboard.
pub fn safe_next(next: &str) -> &str {
    let ok = next.len() <= 2048
        && next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && next
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'\\');
    if ok { next } else { "/" }
}

impl FromRequestParts<AppState> for Page {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match identify(parts, state).await {
            Ok(Some(principal)) => {
                if let Err(e) =
                    principal.allow(auth::required_scope(&parts.method, parts.uri.path()))
                {
                    return Err(e.into_response());
                }
                let csrf = match &principal {
                    Principal::Session { csrf, .. } => csrf.clone(),
                    _ => String::new(),
                };
                Ok(Page { csrf, principal })
            }
            Ok(None) => {
                let asked = (parts.method == axum::http::Method::GET)
                    .then(|| parts.uri.path_and_query().map(|p| p.as_str().to_string()))
                    .flatten();
                Err(ToLogin(asked).into_response())
            }
            Err(e) => Err(e.into_response()),
        }
    }
}

impl Page {
    /// The password and the settings are for the signed-in admin only: never a token.
    fn require_session(&self) -> Result<&str, ApiError> {
        match &self.principal {
            Principal::Session { hash, .. } => Ok(hash),
            _ => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "session_required",
                "settings need a signed-in session (with the current password to change it), \
                 never an API token",
            )),
        }
    }

    /// Checks a form's CSRF token (forms only come from sessions).
    fn check(&self, sent: &str) -> Result<(), ApiError> {
        match &self.principal {
            Principal::Session { csrf, .. } if constant_time_eq(sent, csrf) => Ok(()),
            Principal::Session { .. } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "the form's CSRF token is missing or wrong; reload the page",
            )),
            _ => Ok(()),
        }
    }
}

/// What a template needs to show a run in a list.
pub struct RunRow {
    pub id: String,
    pub number: u64,
    pub pipeline: String,
    /// The pipeline's page, its name percent-encoded.
    pub pipeline_href: String,
    pub status: &'static str,
    pub trigger: String,
    /// When it was created: RFC 3339 (for `<time datetime>`) and UTC text (without JS).
    pub created: String,
    pub created_text: String,
    /// RFC 3339, or empty while it has not happened.
    pub started: String,
    pub finished: String,
    /// How long it ran (so far), and how long it waited for a worker, as text.
    pub took: String,
    pub wait: String,
    pub reason: String,
}

#[derive(Template)]
#[template(path = "run_list.html")]
struct RunListHtml<'a> {
    id: &'a str,
    runs: &'a [RunRow],
}

/// A list of runs, each row a link to its run (the dashboard, a pipeline, the runs page).
pub fn run_list(id: &str, runs: &[RunRow]) -> String {
    RunListHtml { id, runs }.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "rendering a list of runs");
        String::new()
    })
}

/// A time for `<time datetime>` and `data-` attributes.
pub fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn iso_opt(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(iso).unwrap_or_default()
}

/// A time as text for readers without JS (app.js shows it relative, in the viewer's zone).
fn utc_text(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// How long from `a` to `b` (or to now), for people.
fn span(a: chrono::DateTime<chrono::Utc>, b: Option<chrono::DateTime<chrono::Utc>>) -> String {
    human(
        (b.unwrap_or_else(chrono::Utc::now) - a)
            .to_std()
            .unwrap_or_default(),
    )
}

/// How long something took (or has taken so far), for people.
fn took(
    started: Option<chrono::DateTime<chrono::Utc>>,
    finished: Option<chrono::DateTime<chrono::Utc>>,
) -> String {
    started.map(|a| span(a, finished)).unwrap_or_default()
}

fn row(run: &Run) -> RunRow {
    RunRow {
        id: run.id.to_string(),
        number: run.number,
        pipeline: run.pipeline.clone(),
        pipeline_href: pipeline_href(&run.pipeline),
        status: run.status.as_str(),
        trigger: run.trigger.to_string(),
        created: iso(run.created_at),
        created_text: utc_text(run.created_at),
        started: iso_opt(run.started_at),
        finished: iso_opt(run.finished_at),
        took: took(run.started_at, run.finished_at),
        wait: if run.status == skiff_core::run::RunStatus::Queued {
            span(run.created_at, None)
        } else {
            run.started_at
                .map(|s| span(run.created_at, Some(s)))
                .unwrap_or_default()
        },
        reason: run.reason.clone().unwrap_or_default(),
    }
}

/// The newest runs of a pipeline, as rows, and the cursor of the older ones.
async fn recent_runs(
    state: &AppState,
    pipeline: &str,
    limit: u32,
) -> Result<(Vec<RunRow>, Option<String>), ApiError> {
    let page = state
        .store
        .list_runs(&RunQuery {
            pipeline: Some(pipeline.to_string()),
            limit,
            ..RunQuery::default()
        })
        .await?;
    Ok((page.runs.iter().map(row).collect(), page.next))
}

/// The runs in one state, newest first.
async fn runs_in(
    state: &AppState,
    status: skiff_core::run::RunStatus,
    limit: u32,
) -> Result<Vec<RunRow>, ApiError> {
    let page = state
        .store
        .list_runs(&RunQuery {
            status: Some(status),
            limit,
            ..RunQuery::default()
        })
        .await?;
    Ok(page.runs.iter().map(row).collect())
}

/// A pipeline's page: its name is a file's, so anything (`x?y#z`) is encoded.
pub fn pipeline_href(name: &str) -> String {
    format!("/pipelines/{}", crate::web::encode(name))
}

pub struct PipelineCard {
    pub name: String,
    pub href: String,
    pub description: String,
    pub valid: bool,
    pub problems: usize,
    pub manual: bool,
    /// Runs straight from the dashboard (no param needs a value).
    pub one_click: bool,
    pub recent: Vec<RunRow>,
}

#[derive(Template, WebTemplate)]
#[template(path = "dashboard.html")]
pub struct Dashboard {
    csrf: String,
    cards: Vec<PipelineCard>,
    /// What is running and waiting now.
    active: Vec<RunRow>,
    /// The services runs deployed: Start and Stop one tap away.
    services: Vec<ServiceRow>,
    /// Steps run with skiff's own powers: said on the first screen.
    warning: String,
}

pub async fn dashboard(page: Page, State(state): State<AppState>) -> Result<Dashboard, ApiError> {
    let catalog = state.catalog.current();
    let mut cards = Vec::new();
    for e in catalog.entries() {
        let (recent, _) = recent_runs(&state, &e.name, 6).await?;
        let p = e.pipeline.as_deref();
        cards.push(PipelineCard {
            name: e.name.clone(),
            href: pipeline_href(&e.name),
            description: p.and_then(|p| p.description.clone()).unwrap_or_default(),
            valid: p.is_some(),
            problems: e.diagnostics.len(),
            manual: p.is_some_and(|p| p.on.manual),
            one_click: p
                .is_some_and(|p| p.params.iter().all(|q| q.default.is_some() || !q.required)),
            recent,
        });
    }
    let mut active = runs_in(&state, skiff_core::run::RunStatus::Running, 20).await?;
    active.extend(runs_in(&state, skiff_core::run::RunStatus::Queued, 20).await?);
    Ok(Dashboard {
        csrf: page.csrf,
        cards,
        active,
        services: service_rows(&state).await?,
        warning: state.config.steps_warning.clone().unwrap_or_default(),
    })
}

pub struct ParamField {
    pub name: String,
    pub kind: &'static str,
    pub value: String,
    pub description: String,
    pub options: Vec<String>,
    pub required: bool,
    /// Why the value given for it was refused (shown beside the field).
    pub error: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "pipeline.html")]
pub struct PipelinePage {
    csrf: String,
    name: String,
    href: String,
    file: String,
    description: String,
    valid: bool,
    problems: Vec<Problem>,
    manual: bool,
    triggers: Vec<String>,
    schedules: Vec<ScheduleRow>,
    fields: Vec<ParamField>,
    runs: Vec<RunRow>,
    /// The page of older runs (on the runs page), when there are more.
    older: String,
    errors: Vec<String>,
    /// The run the form was prefilled from (its id and number), recorded as `rerun_of`.
    rerun_of: String,
    rerun_of_number: u64,
}

/// One problem of an invalid pipeline, on its page.
pub struct Problem {
    line: u32,
    col: u32,
    message: String,
    context: String,
}

/// One `on.schedule` line on a pipeline's page, with its next slots (shown in the viewer's
/// time zone by app.js; in UTC without it).
pub struct ScheduleRow {
    cron: String,
    timezone: &'static str,
    once: bool,
    /// (RFC 3339, UTC text) of each of the next slots.
    next: Vec<(String, String)>,
}

fn schedule_rows(p: &skiff_core::pipeline::Pipeline) -> Vec<ScheduleRow> {
    let now = chrono::Utc::now();
    p.on.schedules
        .iter()
        .map(|s| ScheduleRow {
            cron: s.cron.clone(),
            timezone: skiff_core::schedule::timezone(s).name(),
            once: s.missed == skiff_core::pipeline::Missed::Once,
            next: skiff_core::schedule::upcoming(s, now, 5)
                .into_iter()
                .map(|t| (iso(t), t.format("%a %Y-%m-%d %H:%M:%S UTC").to_string()))
                .collect(),
        })
        .collect()
}

fn entry_or_404(state: &AppState, name: &str) -> Result<std::sync::Arc<Entry>, ApiError> {
    state
        .catalog
        .current()
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no pipeline `{name}`")))
}

async fn pipeline_page(
    page: &Page,
    state: &AppState,
    name: &str,
    given: &BTreeMap<String, String>,
    errors: Vec<String>,
    field_errors: &[ParamError],
) -> Result<PipelinePage, ApiError> {
    let e = entry_or_404(state, name)?;
    let p = e.pipeline.as_deref();
    let (runs, next) = recent_runs(state, &e.name, 50).await?;
    let older = next
        .map(|c| {
            format!(
                "/runs?pipeline={}&cursor={}",
                crate::web::encode(&e.name),
                crate::web::encode(&c)
            )
        })
        .unwrap_or_default();
    let mut triggers = Vec::new();
    if let Some(p) = p {
        if p.on.manual {
            triggers.push("manual (the Run button, the API)".to_string());
        }
        if let Some(w) = &p.on.webhook {
            let branches = if w.branches.is_empty() {
                String::new()
            } else {
                format!(" on {}", w.branches.join(", "))
            };
            triggers.push(format!(
                "webhook: {}{branches} (POST /hooks/{})",
                w.events.join(", "),
                w.hook
            ));
        }
        for x in &p.permissions {
            triggers.push(match x {
                skiff_core::pipeline::Permission::Docker => {
                    "permission: docker (root on the host; only where the worker allows it)"
                        .to_string()
                }
            });
        }
    }
    // The file's name: the server's own path is nobody's business on a page.
    let file = e
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(PipelinePage {
        csrf: page.csrf.clone(),
        name: e.name.clone(),
        href: pipeline_href(&e.name),
        file: file.clone(),
        description: p.and_then(|p| p.description.clone()).unwrap_or_default(),
        valid: p.is_some(),
        problems: e
            .diagnostics
            .iter()
            .map(|d| {
                let report = Report {
                    file: &file,
                    source: &e.source,
                    diagnostics: std::slice::from_ref(d),
                }
                .to_string();
                Problem {
                    line: d.pos.line,
                    col: d.pos.col,
                    message: d.message.clone(),
                    // The source line with its underline and help (the first line repeats
                    // file, place and message).
                    context: report
                        .split_once('\n')
                        .map(|(_, rest)| rest.trim_end().to_string())
                        .unwrap_or_default(),
                }
            })
            .collect(),
        manual: p.is_some_and(|p| p.on.manual),
        triggers,
        schedules: p.map(schedule_rows).unwrap_or_default(),
        fields: p
            .map(|p| {
                p.params
                    .iter()
                    .map(|q| ParamField {
                        name: q.name.clone(),
                        kind: q.kind.as_str(),
                        value: given
                            .get(&q.name)
                            .cloned()
                            .or_else(|| q.default.clone())
                            .unwrap_or_default(),
                        description: q.description.clone().unwrap_or_default(),
                        options: q.options.clone(),
                        required: q.required,
                        error: field_errors
                            .iter()
                            .filter(|e| e.param == q.name)
                            .map(|e| e.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        runs,
        older,
        errors,
        rerun_of: String::new(),
        rerun_of_number: 0,
    })
}

/// `?from=RUN`: the form prefilled from that run ("Run again with changes...").
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineQuery {
    from: Option<String>,
}

/// The run `from` names, which must be one of pipeline `name`'s.
async fn earlier_run(state: &AppState, name: &str, from: &str) -> Result<Run, ApiError> {
    let run = load_run(state, from).await?;
    if run.pipeline != name {
        return Err(ApiError::bad_request(format!(
            "run {} is a run of {}, not of {name}",
            run.id, run.pipeline
        )));
    }
    Ok(run)
}

/// A form shown again (refused params) still says which run it repeats.
fn keep_rerun_of(shown: &mut PipelinePage, earlier: Option<&Run>) {
    if let Some(earlier) = earlier {
        shown.rerun_of = earlier.id.to_string();
        shown.rerun_of_number = earlier.number;
    }
}

pub async fn pipeline(
    page: Page,
    State(state): State<AppState>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<PipelineQuery>,
) -> Result<PipelinePage, ApiError> {
    let Some(from) = q.from.as_deref().filter(|f| !f.is_empty()) else {
        return pipeline_page(&page, &state, &name, &BTreeMap::new(), Vec::new(), &[]).await;
    };
    let earlier = earlier_run(&state, &name, from).await?;
    let mut shown = pipeline_page(&page, &state, &name, &earlier.params, Vec::new(), &[]).await?;
    keep_rerun_of(&mut shown, Some(&earlier));
    Ok(shown)
}

/// The Run form: `csrf` plus `param.NAME` fields.
pub async fn run_pipeline(
    page: Page,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    page.check(form.get("csrf").map(String::as_str).unwrap_or(""))?;
    let e = entry_or_404(&state, &name)?;
    let given: BTreeMap<String, String> = form
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone())))
        .collect();
    // A checkbox sends nothing when unticked: that means false.
    let mut given = given;
    if let Some(p) = e.pipeline.as_deref() {
        for q in p
            .params
            .iter()
            .filter(|q| q.kind == skiff_core::pipeline::ParamKind::Boolean)
        {
            given
                .entry(q.name.clone())
                .or_insert_with(|| "false".into());
        }
    }
    let trigger = trigger_of(&page.principal, TriggerKind::Manual);
    let earlier = match form.get("rerun_of").filter(|f| !f.is_empty()) {
        Some(from) => Some(earlier_run(&state, &e.name, from).await?),
        None => None,
    };
    let started = match &earlier {
        Some(earlier) => {
            state
                .dispatcher
                .trigger_as_rerun(&e, &given, trigger, earlier)
                .await
        }
        None => state.dispatcher.trigger(&e, &given, trigger).await,
    };
    match started {
        Ok(run) => Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response()),
        Err(DispatchError::Params(errors)) => {
            // Beside its field when it names one; above the form otherwise.
            let declared = |name: &str| {
                e.pipeline
                    .as_deref()
                    .is_some_and(|p| p.param(name).is_some())
            };
            let others = errors
                .iter()
                .filter(|e| !declared(&e.param))
                .map(|e| format!("{}: {}", e.param, e.message))
                .collect();
            let mut shown = pipeline_page(&page, &state, &name, &given, others, &errors).await?;
            keep_rerun_of(&mut shown, earlier.as_ref());
            let mut page = shown.into_response();
            *page.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            Ok(page)
        }
        Err(refused @ DispatchError::NotAccepted { .. }) => {
            let mut shown =
                pipeline_page(&page, &state, &name, &given, vec![refused.to_string()], &[]).await?;
            keep_rerun_of(&mut shown, earlier.as_ref());
            let mut page = shown.into_response();
            *page.status_mut() = StatusCode::CONFLICT;
            Ok(page)
        }
        Err(e) => Err(e.into()),
    }
}

pub struct StepRow {
    pub index: u32,
    pub name: String,
    pub status: &'static str,
    pub phase: &'static str,
    pub took: String,
    /// RFC 3339, or empty while it has not happened (app.js ticks the duration between).
    pub started: String,
    pub finished: String,
    pub reason: String,
    pub attempt: u32,
    /// The outputs the step set (`name`, value).
    pub outputs: Vec<(String, String)>,
}

fn step_row(s: &StepRecord) -> StepRow {
    StepRow {
        index: s.index,
        name: s.name.clone(),
        status: s.status.as_str(),
        phase: s.phase.as_str(),
        took: took(s.started_at, s.finished_at),
        started: iso_opt(s.started_at),
        finished: iso_opt(s.finished_at),
        reason: s.reason.clone().unwrap_or_default(),
        attempt: s.attempt,
        outputs: s
            .outputs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The runs of the same pipeline just before and after `run` (older, newer), as (id, number).
/// The Store lists runs newest first by an opaque cursor, so this walks at most
/// `NEIGHBOUR_PAGES` pages of 500 back from the newest; a run older than that shows none.
async fn neighbours(
    state: &AppState,
    run: &Run,
) -> Result<(Option<(String, u64)>, Option<(String, u64)>), ApiError> {
    const NEIGHBOUR_PAGES: usize = 10;
    let mut cursor = None;
    let mut newer: Option<(String, u64)> = None;
    let mut found = false;
    for _ in 0..NEIGHBOUR_PAGES {
        let page = state
            .store
            .list_runs(&RunQuery {
                pipeline: Some(run.pipeline.clone()),
                limit: 500,
                cursor: cursor.take(),
                ..RunQuery::default()
            })
            .await?;
        for r in &page.runs {
            if found {
                return Ok((Some((r.id.to_string(), r.number)), newer));
            }
            if r.id == run.id {
                found = true;
            } else {
                newer = Some((r.id.to_string(), r.number));
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok((None, if found { newer } else { None }))
}

#[derive(Template, WebTemplate)]
#[template(path = "run.html")]
pub struct RunPage {
    csrf: String,
    run: RunRow,
    params: Vec<(String, String)>,
    steps: Vec<StepRow>,
    active: bool,
    cancel_requested: bool,
    rerun_of: String,
    /// The number of the run this one repeats (when it is still kept).
    rerun_of_number: String,
    /// "Run again with changes...": the current pipeline's form prefilled from this run, when
    /// the pipeline is still there and runs by hand.
    run_again_href: String,
    /// The pipeline's previous (older) and next (newer) runs: (id, number).
    older: Option<(String, u64)>,
    newer: Option<(String, u64)>,
    /// What a queued run that no live worker can take waits for.
    waiting_for: String,
    /// The worker that holds it or held it last.
    worker: String,
}

pub async fn run(
    page: Page,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<RunPage, ApiError> {
    let run = load_run(&state, &id).await?;
    let steps = state.store.steps(&run.id).await?;
    let rerun_of_number = match &run.rerun_of {
        Some(earlier) => state
            .store
            .get_run(earlier)
            .await?
            .map(|r| r.number.to_string())
            .unwrap_or_default(),
        None => String::new(),
    };
    let (older, newer) = neighbours(&state, &run).await?;
    let run_again_href = state
        .catalog
        .current()
        .get(&run.pipeline)
        .filter(|e| e.pipeline.as_deref().is_some_and(|p| p.on.manual))
        .map(|e| format!("{}?from={}", pipeline_href(&e.name), run.id))
        .unwrap_or_default();
    Ok(RunPage {
        waiting_for: crate::workers::waiting_for(&state, &run)
            .await
            .unwrap_or_default(),
        worker: run.claimed_by.clone().unwrap_or_default(),
        older,
        newer,
        run_again_href,
        rerun_of_number,
        csrf: page.csrf,
        params: run
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        steps: steps.iter().map(step_row).collect(),
        active: !run.status.is_terminal(),
        cancel_requested: run.cancel_requested,
        rerun_of: run
            .rerun_of
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        run: row(&run),
    })
}

/// The runs page's filters and page (a GET form: every field may be empty).
#[derive(Deserialize, Default)]
pub struct RunsFilter {
    #[serde(default)]
    pipeline: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    trigger: String,
    #[serde(default)]
    cursor: String,
}

/// One choice of a filter's menu.
pub struct Choice {
    pub value: String,
    pub selected: bool,
}

fn choices<'a>(all: impl IntoIterator<Item = &'a str>, chosen: &str) -> Vec<Choice> {
    all.into_iter()
        .map(|v| Choice {
            value: v.to_string(),
            selected: v == chosen,
        })
        .collect()
}

/// A service on the Services page.
pub struct ServiceRow {
    name: String,
    container: String,
    /// "deploy #3", or "a run no longer kept".
    by: String,
    /// The run that deployed it, else the runs page.
    href: String,
    since: String,
    since_text: String,
    expires: String,
    expires_text: String,
    /// What its engine says now (running, stopped, missing, unknown), and the badge's class.
    state: String,
    state_class: &'static str,
    state_since: String,
    state_since_text: String,
    state_note: String,
    /// The image's HEALTHCHECK verdict (empty without one), and the badge's class.
    health: String,
    health_class: &'static str,
    image: String,
    /// The engine's ID, shortened.
    engine: String,
    addresses: Vec<String>,
    /// (link, "pipeline #N", status) of the runs that acted on it, newest first.
    recent: Vec<(String, String, String)>,
}
#[derive(Template, WebTemplate)]
#[template(path = "services.html")]
pub struct ServicesPage {
    csrf: String,
    services: Vec<ServiceRow>,
}

/// The Services page's Stop, Start and Redeploy buttons: the run that does it, to watch.
pub async fn act_on_service(
    page: Page,
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, ApiError> {
    page.check(&form.csrf)?;
    let run = crate::api::service_action(&state, &page.principal, &name, &action).await?;
    Ok(Redirect::to(&format!("/runs/{}", run.id)))
}

#[derive(Template, WebTemplate)]
#[template(path = "workers.html")]
pub struct WorkersPage {
    csrf: String,
    workers: Vec<WorkerRow>,
}

pub struct WorkerRow {
    name: String,
    host: String,
    labels: String,
    version: String,
    concurrency: u32,
    embedded: bool,
    lost: bool,
    beat: String,
    beat_text: String,
    started: String,
    started_text: String,
    secrets: String,
    actions: usize,
    /// (link, id) of the runs it holds.
    runs: Vec<(String, String)>,
}

/// The workers: labels, capabilities, the runs each holds, and whether it is alive.
pub async fn workers(page: Page, State(state): State<AppState>) -> Result<WorkersPage, ApiError> {
    let workers = crate::workers::rows(&state)
        .await?
        .into_iter()
        .map(|w| WorkerRow {
            labels: w.labels.join(", "),
            beat: iso(w.last_beat),
            beat_text: utc_text(w.last_beat),
            started: iso(w.started_at),
            started_text: utc_text(w.started_at),
            secrets: w.secrets.join(", "),
            actions: w.actions.len(),
            runs: w
                .runs
                .iter()
                .map(|id| (format!("/runs/{id}"), id.chars().take(8).collect()))
                .collect(),
            name: w.name,
            host: w.host,
            version: w.version,
            concurrency: w.concurrency,
            embedded: w.embedded,
            lost: w.lost,
        })
        .collect();
    Ok(WorkersPage {
        csrf: page.csrf,
        workers,
    })
}

/// The services runs deployed, each with its current version and the run behind it.
pub async fn services(page: Page, State(state): State<AppState>) -> Result<ServicesPage, ApiError> {
    Ok(ServicesPage {
        csrf: page.csrf,
        services: service_rows(&state).await?,
    })
}

/// The Services page's list alone: what the live list sends when it changes.
#[derive(Template)]
#[template(path = "service_list.html")]
struct ServiceList {
    csrf: String,
    services: Vec<ServiceRow>,
}

/// The Services page's list, live: its HTML again (`list` events) whenever it changes.
pub async fn services_live(page: Page, State(state): State<AppState>) -> impl IntoResponse {
    let csrf = page.csrf;
    crate::services::live(state, move |state| {
        let csrf = csrf.clone();
        async move {
            let services = service_rows(&state).await.ok()?;
            ServiceList { csrf, services }.render().ok()
        }
    })
}

async fn service_rows(state: &AppState) -> Result<Vec<ServiceRow>, ApiError> {
    Ok(crate::api::services(state, None)
        .await?
        .into_iter()
        .map(|s| ServiceRow {
            by: match (&s.pipeline, s.run_number) {
                (Some(p), Some(n)) => format!("{p} #{n}"),
                _ => "a run no longer kept".into(),
            },
            href: match (&s.run, s.pipeline.is_some()) {
                (Some(id), true) => format!("/runs/{id}"),
                _ => "/runs".into(),
            },
            since: iso(s.since),
            since_text: utc_text(s.since),
            expires: iso_opt(s.expires_at),
            expires_text: s.expires_at.map(utc_text).unwrap_or_default(),
            state_class: match s.state.as_str() {
                "running" => "running",
                "stopped" => "cancelled",
                "missing" => "failed",
                _ => "",
            },
            state: s.state,
            state_since: iso_opt(s.state_since),
            state_since_text: s.state_since.map(utc_text).unwrap_or_default(),
            state_note: s.state_note.unwrap_or_default(),
            health_class: match s.health.as_deref() {
                Some("healthy") => "succeeded",
                Some("unhealthy") => "failed",
                Some(_) => "running",
                None => "",
            },
            health: s.health.unwrap_or_default(),
            image: s.image.unwrap_or_default(),
            engine: s
                .engine
                .map(|e| e.chars().take(12).collect())
                .unwrap_or_default(),
            addresses: s.addresses,
            recent: s
                .recent_runs
                .into_iter()
                .map(|r| {
                    (
                        format!("/runs/{}", r.id),
                        format!("{} #{}", r.pipeline, r.number),
                        r.status,
                    )
                })
                .collect(),
            name: s.name,
            container: s.container,
        })
        .collect())
}

#[derive(Template, WebTemplate)]
#[template(path = "runs.html")]
pub struct RunsPage {
    csrf: String,
    pipelines: Vec<Choice>,
    statuses: Vec<Choice>,
    triggers: Vec<Choice>,
    /// Some filter is set (the page says so, with a way to clear it).
    filtered: bool,
    /// This is the first page (it updates itself while runs are going).
    first: bool,
    runs: Vec<RunRow>,
    /// The next page's address, when there is one.
    older: String,
}

/// Runs of a trigger kind are picked from the Store's pages (which filter by pipeline and
/// status only): at most this many are read for one page of the runs page.
const TRIGGER_SCAN: usize = 2000;
const RUNS_PAGE: u32 = 50;

/// All runs, newest first, filtered by pipeline, status and trigger, 50 a page.
pub async fn runs(
    page: Page,
    State(state): State<AppState>,
    filter: Result<axum::extract::Query<RunsFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<RunsPage, ApiError> {
    let axum::extract::Query(f) = filter?;
    let status = match f.status.as_str() {
        "" => None,
        s => Some(s.parse::<skiff_core::run::RunStatus>().map_err(|_| {
            ApiError::bad_request(format!(
                "no run status `{}`",
                s.chars().take(40).collect::<String>()
            ))
        })?),
    };
    let trigger = match f.trigger.as_str() {
        "" => None,
        t => Some(t.parse::<TriggerKind>().map_err(|_| {
            ApiError::bad_request(format!(
                "no trigger `{}`",
                t.chars().take(40).collect::<String>()
            ))
        })?),
    };
    let mut query = RunQuery {
        pipeline: (!f.pipeline.is_empty()).then(|| f.pipeline.clone()),
        status,
        limit: RUNS_PAGE,
        cursor: (!f.cursor.is_empty()).then(|| f.cursor.clone()),
    };
    let mut runs = Vec::new();
    let mut scanned = 0;
    let next = loop {
        let got = state.store.list_runs(&query).await?;
        scanned += got.runs.len();
        runs.extend(
            got.runs
                .iter()
                .filter(|r| trigger.is_none_or(|t| r.trigger.kind == t))
                .map(row),
        );
        match got.next {
            Some(c) if runs.len() < RUNS_PAGE as usize && scanned < TRIGGER_SCAN => {
                query.cursor = Some(c);
            }
            other => break other,
        }
    };
    let older = next
        .map(|c| {
            let mut q = vec![];
            for (k, v) in [
                ("pipeline", &f.pipeline),
                ("status", &f.status),
                ("trigger", &f.trigger),
            ] {
                if !v.is_empty() {
                    q.push(format!("{k}={}", crate::web::encode(v)));
                }
            }
            q.push(format!("cursor={}", crate::web::encode(&c)));
            format!("/runs?{}", q.join("&"))
        })
        .unwrap_or_default();
    let catalog = state.catalog.current();
    let mut names: Vec<&str> = catalog.entries().map(|e| e.name.as_str()).collect();
    // A removed pipeline's runs can still be asked for.
    if !f.pipeline.is_empty() && !names.contains(&f.pipeline.as_str()) {
        names.push(&f.pipeline);
    }
    Ok(RunsPage {
        csrf: page.csrf,
        pipelines: choices(names, &f.pipeline),
        statuses: choices(
            skiff_core::run::RunStatus::ALL.iter().map(|s| s.as_str()),
            &f.status,
        ),
        triggers: choices(TriggerKind::ALL.iter().map(|t| t.as_str()), &f.trigger),
        filtered: !(f.pipeline.is_empty() && f.status.is_empty() && f.trigger.is_empty()),
        first: f.cursor.is_empty(),
        runs,
        older,
    })
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn cancel_run(
    page: Page,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, ApiError> {
    page.check(&form.csrf)?;
    let run = load_run(&state, &id).await?;
    if !run.status.is_terminal() {
        state
            .store
            .request_cancel(&run.id, &format!("cancelled by {}", page.principal.actor()))
            .await?;
    }
    Ok(Redirect::to(&format!("/runs/{}", run.id)))
}

pub async fn rerun_run(
    page: Page,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, ApiError> {
    page.check(&form.csrf)?;
    let run = load_run(&state, &id).await?;
    let new = state
        .dispatcher
        .rerun(&run, trigger_of(&page.principal, TriggerKind::Rerun))
        .await?;
    Ok(Redirect::to(&format!("/runs/{}", new.id)))
}

// ---- login ----

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
pub struct LoginPage {
    error: String,
    has_password: bool,
    /// Where signing in leads (already checked by `safe_next`).
    next: String,
}

#[derive(Deserialize, Default)]
pub struct NextQuery {
    #[serde(default)]
    next: String,
}

/// The sign-in form; someone already signed in goes on to where they were going (or home).
pub async fn login_form(
    State(state): State<AppState>,
    parts: Parts,
    query: Result<axum::extract::Query<NextQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let next = query.map(|q| q.0.next).unwrap_or_default();
    let next = safe_next(&next).to_string();
    if identify(&parts, &state).await?.is_some() {
        return Ok(Redirect::to(&next).into_response());
    }
    Ok(LoginPage {
        error: String::new(),
        has_password: state.auth.password_hash().await?.is_some(),
        next,
    }
    .into_response())
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
}

fn signed_in(cookie: String, next: &str) -> Response {
    (
        [(header::SET_COOKIE, cookie)],
        Redirect::to(safe_next(next)),
    )
        .into_response()
}

pub async fn login(
    State(state): State<AppState>,
    auth::ClientAddr(addr): auth::ClientAddr,
    Form(form): Form<LoginForm>,
) -> Result<Response, ApiError> {
    let hash = state.auth.password_hash().await?;
    // Counted before the password is checked: parallel guesses cannot slip between the two.
    let ok = match state
        .login_throttle
        .verify(addr, &form.password, hash.as_deref())
        .await
    {
        Ok(ok) => ok,
        Err(wait) => {
            metrics::counter!("skiff_login_refused_total").increment(1);
            let page = LoginPage {
                next: safe_next(&form.next).to_string(),
                error: format!(
                    "too many password attempts from your address; try again in {} s (or use \
                     `skiff login-link`)",
                    wait.as_secs().max(1)
                ),
                has_password: hash.is_some(),
            };
            let retry = (header::RETRY_AFTER, wait.as_secs().max(1).to_string());
            return Ok((StatusCode::TOO_MANY_REQUESTS, [retry], page).into_response());
        }
    };
    if !ok {
        metrics::counter!("skiff_login_failures_total").increment(1);
        let page = LoginPage {
            next: safe_next(&form.next).to_string(),
            error: "wrong password".into(),
            has_password: hash.is_some(),
        };
        return Ok((StatusCode::UNAUTHORIZED, page).into_response());
    }
    let cookie = auth::start_session(&state).await?;
    Ok(signed_in(cookie, &form.next))
}

/// A `HEAD` of a sign-in link (a chat app previewing it, a link checker) does not use it up.
pub async fn login_link_head() -> StatusCode {
    StatusCode::OK
}

pub async fn login_link(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    if !state.auth.use_login_link(&hash_secret(&token)).await? {
        let page = LoginPage {
            error: "this login link was already used or has expired; restart skiff serve or run `skiff login-link` for a new one".into(),
            has_password: state.auth.password_hash().await?.is_some(),
            next: "/".into(),
        };
        return Ok((StatusCode::UNAUTHORIZED, page).into_response());
    }
    let cookie = auth::start_session(&state).await?;
    Ok(signed_in(cookie, "/"))
}

pub async fn logout(
    page: Page,
    State(state): State<AppState>,
    parts: axum::http::HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ApiError> {
    page.check(&form.csrf)?;
    if let Some(c) = auth::cookie(&parts, auth::SESSION_COOKIE) {
        state.auth.delete_session(&hash_secret(&c)).await?;
    }
    Ok((
        [(header::SET_COOKIE, auth::clear_session_cookie())],
        Redirect::to("/login"),
    )
        .into_response())
}

// ---- settings ----

pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub scope: &'static str,
    pub legacy: bool,
    pub created: String,
    pub last_used: String,
    pub revoked: bool,
}

fn token_row(t: &ApiToken) -> TokenRow {
    TokenRow {
        id: t.id.clone(),
        name: t.name.clone(),
        scope: t.scope.as_str(),
        legacy: t.legacy,
        created: t.created_at.format("%Y-%m-%d %H:%M").to_string(),
        last_used: t
            .last_used_at
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "never".into()),
        revoked: t.revoked_at.is_some(),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "settings.html")]
pub struct SettingsPage {
    csrf: String,
    has_password: bool,
    tokens: Vec<TokenRow>,
    /// What happened (`ok`) or what was refused (`error`).
    message: String,
    message_kind: &'static str,
    /// A token just created: its secret (shown once), name and scope.
    new_token: String,
    new_token_name: String,
    new_token_scope: &'static str,
}

async fn settings_page(
    page: &Page,
    state: &AppState,
    message: String,
    ok: bool,
) -> Result<SettingsPage, ApiError> {
    Ok(SettingsPage {
        csrf: page.csrf.clone(),
        has_password: state.auth.password_hash().await?.is_some(),
        tokens: state
            .auth
            .list_tokens()
            .await?
            .iter()
            .map(token_row)
            .collect(),
        message,
        message_kind: if ok { "ok" } else { "error" },
        new_token: String::new(),
        new_token_name: String::new(),
        new_token_scope: "",
    })
}

/// A new token's secret travels from its POST to the next GET of the settings in this cookie
/// (HttpOnly, for the settings only, a minute at most), which that GET clears: the secret is
/// shown once, and a reload neither shows it again nor creates another token. A cookie rather
/// than server memory, so it works with several servers behind one address.
const NEW_TOKEN_COOKIE: &str = "skiff_new_token";

fn new_token_cookie(value: &str, max_age: u32, secure: bool) -> String {
    format!(
        "{NEW_TOKEN_COOKIE}={value}; Path=/settings; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

pub async fn settings(
    page: Page,
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    page.require_session()?;
    let mut shown = settings_page(&page, &state, String::new(), true).await?;
    let Some(flash) = auth::cookie(&headers, NEW_TOKEN_COOKIE) else {
        return Ok(shown.into_response());
    };
    // `<id>.<secret>`: shown when the id is a live token's and the secret looks like one.
    if let Some((id, secret)) = flash.split_once('.')
        && secret.starts_with("skiff_")
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && let Some(t) = state
            .auth
            .list_tokens()
            .await?
            .into_iter()
            .find(|t| t.id == id && t.revoked_at.is_none())
    {
        shown.new_token = secret.to_string();
        shown.new_token_name = t.name.clone();
        shown.new_token_scope = t.scope.as_str();
        shown.message = format!(
            "token `{}` ({}) created; copy it now, it is not shown again",
            t.name,
            t.scope.as_str()
        );
    }
    let clear = new_token_cookie("", 0, state.config.secure_cookies);
    Ok(([(header::SET_COOKIE, clear)], shown).into_response())
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    csrf: String,
    /// The password now (when one is set).
    #[serde(default)]
    current: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
}

/// The shortest password accepted.
const MIN_PASSWORD: usize = 10;

/// Sets the admin password: a signed-in session only (never a token), with the current
/// password when one is set (checked like a login, and counted against the address); every
/// other session ends.
pub async fn set_password(
    page: Page,
    State(state): State<AppState>,
    auth::ClientAddr(addr): auth::ClientAddr,
    Form(form): Form<PasswordForm>,
) -> Result<Response, ApiError> {
    let session = page.require_session()?.to_string();
    page.check(&form.csrf)?;
    let current_hash = state.auth.password_hash().await?;
    let (page, state) = (&page, &state);
    let refuse = |status: StatusCode, message: String| async move {
        Ok::<_, ApiError>(
            (status, settings_page(page, state, message, false).await?).into_response(),
        )
    };
    if current_hash.is_some() {
        match state
            .login_throttle
            .verify(addr, &form.current, current_hash.as_deref())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "the current password is wrong".to_string(),
                )
                .await;
            }
            Err(wait) => {
                return refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many password attempts from your address; try again in {} s",
                        wait.as_secs().max(1)
                    ),
                )
                .await;
            }
        }
    }
    if form.password.chars().count() < MIN_PASSWORD {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("a password needs at least {MIN_PASSWORD} characters"),
        )
        .await;
    }
    if form.password != form.confirm {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the two passwords differ".to_string(),
        )
        .await;
    }
    let password = form.password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| ApiError::internal("hashing", e))??;
    state.auth.set_password_hash(&hash).await?;
    // Whoever else was signed in (with the old password, or a stolen cookie) is signed out.
    state.auth.delete_sessions_except(&session).await?;
    Ok((
        StatusCode::OK,
        settings_page(
            page,
            state,
            "password set; every other session was signed out".to_string(),
            true,
        )
        .await?,
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    scope: String,
}

pub async fn create_token(
    page: Page,
    State(state): State<AppState>,
    Form(form): Form<TokenForm>,
) -> Result<Response, ApiError> {
    page.require_session()?;
    page.check(&form.csrf)?;
    let checked = crate::api::check_token_name(&form.name)
        .and_then(|n| Ok((n, crate::api::parse_scope(Some(form.scope.as_str()))?)));
    let (name, scope) = match checked {
        Ok(n) => n,
        Err(e) => {
            return Ok((
                StatusCode::UNPROCESSABLE_ENTITY,
                settings_page(&page, &state, e.message, false).await?,
            )
                .into_response());
        }
    };
    let secret = auth::random_token("skiff_");
    let token = state
        .auth
        .create_token(&name, &hash_secret(&secret), scope)
        .await?;
    let flash = new_token_cookie(
        &format!("{}.{secret}", token.id),
        60,
        state.config.secure_cookies,
    );
    Ok(([(header::SET_COOKIE, flash)], Redirect::to("/settings")).into_response())
}

pub async fn revoke_token(
    page: Page,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, ApiError> {
    page.require_session()?;
    page.check(&form.csrf)?;
    state.auth.revoke_token(&id).await?;
    Ok(Redirect::to("/settings"))
}

/// A param's name as a label: `target_env` -> "Target env", `dry-run` -> "Dry run".
pub fn humanise(name: &str) -> String {
    let spaced: String = name
        .chars()
        .map(|c| if c == '_' || c == '-' { ' ' } else { c })
        .collect();
    let mut chars = spaced.trim().chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The symbol shown beside a status.
pub fn symbol(status: &str) -> &'static str {
    match status {
        "succeeded" => "✓",
        "failed" => "✗",
        "running" => "●",
        "queued" | "pending" => "○",
        "cancelled" => "⊘",
        "timed_out" => "⏱",
        "skipped" => "–",
        _ => "?",
    }
}

impl RunRow {
    pub fn symbol(&self) -> &'static str {
        symbol(self.status)
    }

    /// The status as a word (`timed out`).
    pub fn label(&self) -> String {
        self.status.replace('_', " ")
    }
}

impl StepRow {
    pub fn symbol(&self) -> &'static str {
        symbol(self.status)
    }

    /// The status as a word (`timed out`), read out by a screen reader as it changes.
    pub fn status_word(&self) -> String {
        self.status.replace('_', " ")
    }
}

/// A delivery on the Deliveries page.
pub struct DeliveryRow {
    key: String,
    hook: String,
    what: String,
    verified: bool,
    outcome: &'static str,
    reason: String,
    at: String,
    at_text: String,
    redelivered_by: String,
    results: Vec<ResultRow>,
}

/// What a delivery came to for one pipeline.
pub struct ResultRow {
    pipeline: String,
    outcome: &'static str,
    reason: String,
    run: String,
}

fn delivery_row(d: &skiff_core::store::Delivery) -> DeliveryRow {
    DeliveryRow {
        key: d.key.clone(),
        hook: d.hook.clone(),
        what: format!("{} {} · {}", d.provider, d.event, d.id),
        verified: d.verified,
        outcome: d.outcome.as_str(),
        reason: d.reason.clone().unwrap_or_default(),
        at: iso(d.received_at),
        at_text: utc_text(d.received_at),
        redelivered_by: d
            .redelivery
            .as_ref()
            .map(|r| format!("redelivery #{} by {}", r.count, r.by))
            .unwrap_or_default(),
        results: d
            .results
            .iter()
            .map(|r| ResultRow {
                pipeline: r.pipeline.clone(),
                outcome: r.outcome.as_str(),
                reason: r.reason.clone().unwrap_or_default(),
                run: r.run.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "deliveries.html")]
pub struct DeliveriesPage {
    csrf: String,
    hook: String,
    deliveries: Vec<DeliveryRow>,
}

#[derive(Deserialize)]
pub struct DeliveriesFilter {
    #[serde(default)]
    hook: String,
}

/// The webhook deliveries of the last 7 days, newest first (one hook's with `?hook=`).
pub async fn deliveries(
    page: Page,
    State(state): State<AppState>,
    filter: Result<
        axum::extract::Query<DeliveriesFilter>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<DeliveriesPage, ApiError> {
    let axum::extract::Query(f) = filter?;
    let found = state
        .store
        .deliveries(&skiff_core::store::DeliveryQuery {
            hook: (!f.hook.is_empty()).then(|| f.hook.clone()),
            id: None,
            limit: 200,
        })
        .await?;
    Ok(DeliveriesPage {
        csrf: page.csrf,
        hook: f.hook,
        deliveries: found.iter().map(delivery_row).collect(),
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "delivery.html")]
pub struct DeliveryPage {
    csrf: String,
    d: DeliveryRow,
    headers: Vec<(String, String)>,
    body: String,
    body_len: u64,
    body_whole: bool,
    /// Why it cannot be sent again (empty: it can).
    no_redeliver: String,
}

/// One delivery: what came of it, its headers and body, and Redeliver.
pub async fn delivery(
    page: Page,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<DeliveryPage, ApiError> {
    let d = crate::hooks::find(&state, &key).await?;
    let no_redeliver = crate::hooks::why_not_redeliverable(&d).unwrap_or_default();
    Ok(DeliveryPage {
        csrf: page.csrf,
        d: delivery_row(&d),
        headers: d.headers.clone(),
        body: String::from_utf8_lossy(&d.body).into_owned(),
        body_len: d.body_len,
        body_whole: d.body_whole(),
        no_redeliver,
    })
}

/// Redeliver: the delivery is evaluated again as skiff's own redelivery (new runs, who asked
/// recorded); lands on the new entry.
pub async fn redeliver(
    page: Page,
    State(state): State<AppState>,
    Path(key): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, ApiError> {
    page.check(&form.csrf)?;
    let d = crate::hooks::redeliver(&state, &page.principal, &key).await?;
    Ok(Redirect::to(&format!(
        "/deliveries/{}",
        crate::web::encode(&d.key)
    )))
}

/// Lines on one page of the log without JavaScript (`/runs/{id}/log`).
pub const LOG_PAGE_LINES: usize = 2000;

/// One row of the script-free log: a numbered line (HTML, ANSI colours as classes), or the
/// header of a step that starts there.
pub struct LogRow {
    pub number: usize,
    pub html: String,
    pub head: String,
    /// A step header's step status (`failed` makes it red).
    pub status: &'static str,
}

impl LogRow {
    /// The status in words (`timed out`).
    pub fn status_word(&self) -> String {
        self.status.replace('_', " ")
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "log.html")]
pub struct LogPage {
    csrf: String,
    run: RunRow,
    rows: Vec<LogRow>,
    page: usize,
    pages: usize,
    total: usize,
    prev: String,
    next: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogPageQuery {
    page: Option<String>,
}

/// The log rendered on the server, 2,000 lines a page: readable without JavaScript. Line `n`
/// is `#Ln` as on the run page; colours carry over from earlier pages.
pub async fn log_page(
    page_auth: Page,
    State(state): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogPageQuery>,
) -> Result<LogPage, ApiError> {
    let run = load_run(&state, &id).await?;
    let page = match q.page.as_deref() {
        None | Some("") => 1,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| {
                ApiError::bad_request(format!("page must be a number from 1, not `{text}`"))
            })?,
    };
    let names: BTreeMap<u32, (String, &'static str)> = state
        .store
        .steps(&run.id)
        .await?
        .into_iter()
        .map(|s| (s.index, (s.name, s.status.as_str())))
        .collect();
    let first = (page - 1).saturating_mul(LOG_PAGE_LINES) + 1;
    let last = first.saturating_add(LOG_PAGE_LINES - 1);
    let mut rows = Vec::new();
    let mut colour = crate::ansi::Carry::default();
    let mut number = 0usize;
    let mut step: Option<Option<u32>> = None;
    let mut partial: Vec<u8> = Vec::new();
    let mut on_lines = |text: &[u8], chunk_step: Option<u32>, rows: &mut Vec<LogRow>| {
        let text = String::from_utf8_lossy(text);
        for html in colour.lines_to_html(&text) {
            number += 1;
            if step != Some(chunk_step) {
                step = Some(chunk_step);
                if (first..=last).contains(&number)
                    && let Some(index) = chunk_step
                {
                    let (name, status) = names
                        .get(&index)
                        .cloned()
                        .unwrap_or_else(|| (format!("step {index}"), ""));
                    rows.push(LogRow {
                        number: 0,
                        html: String::new(),
                        head: name,
                        status,
                    });
                }
            }
            if (first..=last).contains(&number) {
                rows.push(LogRow {
                    number,
                    html,
                    head: String::new(),
                    status: "",
                });
            }
        }
    };
    let mut offset = 0;
    let mut partial_step = None;
    loop {
        let read = state
            .store
            .read_logs(&run.id, offset, crate::api::MAX_LOG_READ as usize)
            .await?;
        if read.chunks.is_empty() {
            break;
        }
        for chunk in &read.chunks {
            if !partial.is_empty() && partial_step != chunk.step {
                on_lines(&std::mem::take(&mut partial), partial_step, &mut rows);
            }
            partial_step = chunk.step;
            match memchr::memrchr(b'\n', &chunk.data) {
                Some(end) => {
                    partial.extend_from_slice(&chunk.data[..=end]);
                    on_lines(&std::mem::take(&mut partial), chunk.step, &mut rows);
                    partial.extend_from_slice(&chunk.data[end + 1..]);
                }
                None => partial.extend_from_slice(&chunk.data),
            }
        }
        if read.next_offset <= offset || read.next_offset >= read.len {
            break;
        }
        offset = read.next_offset;
    }
    if !partial.is_empty() {
        on_lines(&partial, partial_step, &mut rows);
    }
    let total = number;
    let pages = total.div_ceil(LOG_PAGE_LINES).max(1);
    if page > pages {
        return Err(ApiError::not_found(format!(
            "this log has {pages} page{} of {LOG_PAGE_LINES} lines, not {page}",
            if pages == 1 { "" } else { "s" }
        )));
    }
    let href = |p: usize| format!("/runs/{}/log?page={p}", run.id);
    Ok(LogPage {
        csrf: page_auth.csrf,
        prev: if page > 1 {
            href(page - 1)
        } else {
            String::new()
        },
        next: if page < pages {
            href(page + 1)
        } else {
            String::new()
        },
        run: row(&run),
        rows,
        page,
        pages,
        total,
    })
}

/// The run's log as it was written (ANSI codes included, secrets already masked), as a
/// download named after the run; streamed in 1 MiB reads.
pub async fn raw_log(
    _page: Page,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let run = load_run(&state, &id).await?;
    let store = state.store.clone();
    let run_id = run.id.clone();
    let body = futures_util::stream::unfold(Some(0u64), move |offset| {
        let store = store.clone();
        let run_id = run_id.clone();
        async move {
            let offset = offset?;
            match store
                .read_logs(&run_id, offset, crate::api::MAX_LOG_READ as usize)
                .await
            {
                Ok(read) if read.chunks.is_empty() => None,
                Ok(read) => {
                    let bytes: Vec<u8> = read.chunks.iter().flat_map(|c| c.data.clone()).collect();
                    let next = (read.next_offset > offset && read.next_offset < read.len)
                        .then_some(read.next_offset);
                    Some((Ok::<_, std::io::Error>(bytes), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let name: String = run
        .pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}-{}.log\"", run.number),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}
