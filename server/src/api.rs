//! The REST API: JSON in and out. The wire types below are what the handlers send and what the
//! OpenAPI document describes (`utoipa` derives the schemas from them, and each handler's
//! `#[utoipa::path]` lists the statuses it answers; see `openapi.rs` for the ones every route
//! shares), so the document cannot drift from the code.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use skiff_core::catalog::Entry;
use skiff_core::pipeline::{ParamError, ParamKind, Phase, Pipeline, StepAction};
use skiff_core::run::{Run, RunId, RunStatus, StepRecord, StepStatus, Trigger, TriggerKind};
use skiff_core::store::{ApiToken, RunQuery};
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::{Auth, Scope, hash_secret, random_token};
use crate::error::{ApiError, ErrorBody, JsonObject, Path, Query};

// ---- enums on the wire: their values come from the domain types ----

fn string_enum(values: impl IntoIterator<Item = &'static str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .build()
}

fn run_status_schema() -> Object {
    string_enum(RunStatus::ALL.iter().map(|s| s.as_str()))
}

fn step_status_schema() -> Object {
    string_enum(StepStatus::ALL.iter().map(|s| s.as_str()))
}

fn trigger_kind_schema() -> Object {
    string_enum(TriggerKind::ALL.iter().map(|s| s.as_str()))
}

fn param_kind_schema() -> Object {
    // The match makes a new kind a compile error here until it is listed.
    let all = [
        ParamKind::String,
        ParamKind::Boolean,
        ParamKind::Number,
        ParamKind::Choice,
    ];
    for k in all {
        match k {
            ParamKind::String | ParamKind::Boolean | ParamKind::Number | ParamKind::Choice => {}
        }
    }
    string_enum(all.map(ParamKind::as_str))
}

fn phase_schema() -> Object {
    let all = [Phase::Main, Phase::Finally];
    for p in all {
        match p {
            Phase::Main | Phase::Finally => {}
        }
    }
    string_enum(all.map(Phase::as_str))
}

fn param_value_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                    Type::String,
                    Type::Number,
                    Type::Boolean,
                    Type::Null,
                ]))
                .description(Some(
                    "a string, a number (kept as written: `1.50` stays `1.50`), a boolean, or \
                     null (not given: the default applies)",
                )),
        ))
        .build()
}

// ---- wire types ----

/// A problem in a pipeline's file.
#[derive(Serialize, ToSchema)]
pub struct DiagnosticDto {
    pub line: u32,
    pub column: u32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ParamDto {
    pub name: String,
    #[serde(rename = "type")]
    #[schema(schema_with = param_kind_schema)]
    pub kind: &'static str,
    pub default: Option<String>,
    pub description: Option<String>,
    /// The choices of a `choice` param.
    pub options: Vec<String>,
    pub required: bool,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookDto {
    /// The endpoint's id: `POST /hooks/{hook}`.
    pub hook: String,
    pub events: Vec<String>,
    pub branches: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ScheduleDto {
    pub cron: String,
    pub timezone: Option<String>,
    /// What becomes of slots missed while no server ran: `skip` or `once`.
    pub missed: &'static str,
    pub params: BTreeMap<String, String>,
    /// The next five slots (UTC).
    pub next: Vec<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct TriggersDto {
    /// Whether the pipeline can be started by hand (API, UI, `skiff trigger`).
    pub manual: bool,
    pub webhook: Option<WebhookDto>,
    pub schedules: Vec<ScheduleDto>,
}

/// A step as the pipeline declares it.
#[derive(Serialize, ToSchema)]
pub struct PipelineStepDto {
    pub id: String,
    pub name: String,
    #[schema(schema_with = phase_schema)]
    pub phase: &'static str,
    /// The built-in action, for a `uses:` step.
    #[schema(value_type = Option<String>)]
    pub uses: Option<&'static str>,
}

/// A pipeline file: valid (with its params, triggers and steps) or not (with its diagnostics).
#[derive(Serialize, ToSchema)]
pub struct PipelineDto {
    pub name: String,
    pub file: String,
    pub valid: bool,
    pub description: Option<String>,
    pub diagnostics: Vec<DiagnosticDto>,
    pub params: Vec<ParamDto>,
    /// `null` for an invalid pipeline.
    pub triggers: Option<TriggersDto>,
    pub steps: Vec<PipelineStepDto>,
    /// Powers it asks for beyond an isolated step's: `docker` (the Docker socket, root on the
    /// host; given only by a worker started with `--allow-docker-steps`).
    pub permissions: Vec<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub struct PipelineList {
    pub pipelines: Vec<PipelineDto>,
}

pub fn pipeline_dto(entry: &Entry) -> PipelineDto {
    let p: Option<&Pipeline> = entry.pipeline.as_deref();
    PipelineDto {
        name: entry.name.clone(),
        file: entry
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        valid: p.is_some(),
        description: p.and_then(|p| p.description.clone()),
        diagnostics: entry
            .diagnostics
            .iter()
            .map(|d| DiagnosticDto {
                line: d.pos.line,
                column: d.pos.col,
                message: d.message.clone(),
                help: d.help.clone(),
            })
            .collect(),
        params: p
            .map(|p| {
                p.params
                    .iter()
                    .map(|q| ParamDto {
                        name: q.name.clone(),
                        kind: q.kind.as_str(),
                        default: q.default.clone(),
                        description: q.description.clone(),
                        options: q.options.clone(),
                        required: q.required,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        triggers: p.map(|p| TriggersDto {
            manual: p.on.manual,
            webhook: p.on.webhook.as_ref().map(|w| WebhookDto {
                hook: w.hook.clone(),
                events: w.events.clone(),
                branches: w.branches.clone(),
            }),
            schedules: p
                .on
                .schedules
                .iter()
                .map(|s| ScheduleDto {
                    cron: s.cron.clone(),
                    timezone: s.timezone.map(|t| t.name().to_string()),
                    missed: s.missed.as_str(),
                    params: s.params.iter().cloned().collect(),
                    next: skiff_core::schedule::upcoming(s, Utc::now(), 5),
                })
                .collect(),
        }),
        steps: p
            .map(|p| {
                p.all_steps()
                    .map(|s| PipelineStepDto {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        phase: s.phase.as_str(),
                        uses: match &s.action {
                            StepAction::Uses { action, .. } => Some(action.name()),
                            StepAction::Run { .. } => None,
                        },
                    })
                    .collect()
            })
            .unwrap_or_default(),
        permissions: p
            .map(|p| p.permissions.iter().map(|x| x.as_str()).collect())
            .unwrap_or_default(),
    }
}

/// One step of a run.
#[derive(Serialize, ToSchema)]
pub struct StepDto {
    pub index: u32,
    pub id: String,
    pub name: String,
    #[schema(schema_with = phase_schema)]
    pub phase: &'static str,
    #[schema(schema_with = step_status_schema)]
    pub status: &'static str,
    pub attempt: u32,
    pub exit_code: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub reason: Option<String>,
    pub outputs: BTreeMap<String, String>,
}

pub fn step_dto(s: &StepRecord) -> StepDto {
    StepDto {
        index: s.index,
        id: s.id.clone(),
        name: s.name.clone(),
        phase: s.phase.as_str(),
        status: s.status.as_str(),
        attempt: s.attempt,
        exit_code: s.exit_code,
        started_at: s.started_at,
        finished_at: s.finished_at,
        duration_ms: s
            .started_at
            .zip(s.finished_at)
            .map(|(a, b)| (b - a).num_milliseconds()),
        reason: s.reason.clone(),
        outputs: s.outputs.clone(),
    }
}

/// What started a run, and who.
#[derive(Serialize, ToSchema)]
pub struct TriggerDto {
    #[schema(schema_with = trigger_kind_schema)]
    pub kind: &'static str,
    /// `admin`, `token:<name>`, `admin-token`, a user name...
    pub actor: String,
}

#[derive(Serialize, ToSchema)]
pub struct RunDto {
    pub id: String,
    pub pipeline: String,
    pub number: u64,
    #[schema(schema_with = run_status_schema)]
    pub status: &'static str,
    pub trigger: TriggerDto,
    pub params: BTreeMap<String, String>,
    pub rerun_of: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub reason: Option<String>,
    pub log_len: u64,
    pub cancel_requested: bool,
    /// Its concurrency group (the pipeline's `concurrency:`), if any.
    pub group: Option<String>,
    /// Queued without a job: another run of its group is ahead of it.
    pub held: bool,
    /// The worker that holds the run, or held it last (`null` before one took it).
    pub worker: Option<String>,
    /// Only on `GET /api/runs/{id}`, for a queued run that its concurrency group holds ("deploy
    /// #12 of group app-deploy") or that no live worker can take ("a worker with labels aws").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Only on `GET /api/runs/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepDto>>,
}

pub fn run_dto(r: &Run, steps: Option<&[StepRecord]>) -> RunDto {
    RunDto {
        id: r.id.to_string(),
        pipeline: r.pipeline.clone(),
        number: r.number,
        status: r.status.as_str(),
        trigger: TriggerDto {
            kind: r.trigger.kind.as_str(),
            actor: r.trigger.actor.clone(),
        },
        params: r.params.clone(),
        rerun_of: r.rerun_of.as_ref().map(ToString::to_string),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        duration_ms: r
            .started_at
            .zip(r.finished_at)
            .map(|(a, b)| (b - a).num_milliseconds()),
        reason: r.reason.clone(),
        log_len: r.log_len,
        cancel_requested: r.cancel_requested,
        group: r.group.clone(),
        held: r.held,
        worker: r.claimed_by.clone(),
        waiting_for: None,
        steps: steps.map(|s| s.iter().map(step_dto).collect()),
    }
}

#[derive(Serialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<RunDto>,
    /// The cursor of the next page, `null` on the last.
    pub next: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct LogChunkDto {
    pub offset: u64,
    /// The step that wrote it (its index), `null` for lines about the run as a whole.
    pub step: Option<u32>,
    /// `output` (a step's stdout and stderr, in order), `stdout`, `stderr`, or `skiff` (lines
    /// skiff writes about the run).
    pub stream: &'static str,
    /// When these lines were read (each line of a chunk has its time).
    pub at: DateTime<Utc>,
    pub text: String,
}

#[derive(Serialize, ToSchema)]
pub struct LogsDto {
    pub offset: u64,
    /// Where the next read starts.
    pub next_offset: u64,
    /// The log's length so far.
    pub len: u64,
    /// The run ended and this read reached the end of its log.
    pub complete: bool,
    pub chunks: Vec<LogChunkDto>,
}

/// An API token (never its secret).
#[derive(Serialize, ToSchema)]
pub struct TokenDto {
    pub id: String,
    pub name: String,
    /// `read` (GET routes), `run` (also start, cancel, rerun), `admin` (also tokens).
    pub scope: &'static str,
    /// Made before tokens had scopes (and given `admin` so that nothing broke).
    pub legacy: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenDto>,
}

/// A new API token with its secret, shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedTokenDto {
    pub id: String,
    pub name: String,
    pub scope: &'static str,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The secret: send it as `Authorization: Bearer <token>`.
    pub token: String,
}

fn token_dto(t: &ApiToken) -> TokenDto {
    TokenDto {
        id: t.id.clone(),
        name: t.name.clone(),
        scope: t.scope.as_str(),
        legacy: t.legacy,
        created_at: t.created_at,
        last_used_at: t.last_used_at,
        revoked_at: t.revoked_at,
    }
}

// ---- helpers ----

pub fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::not_found(format!(
            "no run `{}`",
            text.chars().take(64).collect::<String>()
        ))
    })
}

pub async fn load_run(state: &AppState, id: &str) -> Result<Run, ApiError> {
    let id = parse_run_id(id)?;
    state
        .store
        .get_run(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run {id}")))
}

fn entry(state: &AppState, name: &str) -> Result<std::sync::Arc<Entry>, ApiError> {
    state.catalog.current().get(name).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "no pipeline `{}`",
            name.chars().take(100).collect::<String>()
        ))
    })
}

/// 201 with the new run and where to find it.
fn created(run: &Run) -> Response {
    let location = format!("/api/runs/{}", run.id);
    (
        StatusCode::CREATED,
        [("location", location)],
        Json(run_dto(run, None)),
    )
        .into_response()
}

pub fn trigger_of(principal: &crate::auth::Principal, kind: TriggerKind) -> Trigger {
    Trigger {
        kind,
        actor: principal.actor(),
    }
}

/// The one rule for every `limit` parameter: absent means `default`; 0 or more than `max` is a
/// 400 that names the range (never silently clamped).
pub fn check_limit(given: Option<u64>, default: u64, max: u64) -> Result<u64, ApiError> {
    match given {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max} (got {n}; without it, {default})"
        ))),
    }
}

// ---- handlers ----

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// Liveness: `ok` while the server answers.
#[utoipa::path(get, path = "/healthz", tag = "server",
    responses((status = 200, description = "the server is up", body = String, content_type = "text/plain", example = "ok")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Prometheus metrics (text exposition format): runs by status, queue depth, runs finished,
/// step durations and queue waits (histograms).
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "the metrics", body = String, content_type = "text/plain; version=0.0.4")))]
pub async fn metrics(_auth: Auth, State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = state.store.status_counts().await?;
    for status in RunStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("skiff_runs", "status" => status.as_str()).set(n as f64);
    }
    let queued = counts
        .iter()
        .find(|(s, _)| *s == RunStatus::Queued)
        .map_or(0, |(_, n)| *n);
    metrics::gauge!("skiff_queue_depth").set(queued as f64);
    let own = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    let text = match &state.workers {
        Some(view) => {
            let remote = view.metrics().await;
            if remote.is_empty() {
                own
            } else {
                crate::workers::merge_metrics(&own, &remote)
            }
        }
        None => own,
    };
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

/// Every pipeline in the folder, valid or not.
#[utoipa::path(get, path = "/api/pipelines", tag = "pipelines",
    responses((status = 200, description = "the pipelines", body = PipelineList)))]
pub async fn list_pipelines(_auth: Auth, State(state): State<AppState>) -> Json<PipelineList> {
    let catalog = state.catalog.current();
    Json(PipelineList {
        pipelines: catalog.entries().map(|e| pipeline_dto(e)).collect(),
    })
}

/// One pipeline, valid (params, triggers, steps) or not (diagnostics).
#[utoipa::path(get, path = "/api/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "the pipeline's name")),
    responses(
        (status = 200, description = "the pipeline", body = PipelineDto),
        (status = 404, description = "no such pipeline", body = ErrorBody)))]
pub async fn get_pipeline(
    _auth: Auth,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PipelineDto>, ApiError> {
    Ok(Json(pipeline_dto(&*entry(&state, &name)?)))
}

/// The body of a trigger: a JSON object (an array is refused).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerBody {
    /// The run's params by name. Each value is kept as its text: a string's characters, a
    /// number as written (no rounding), `true`/`false`; `null` leaves the param out (its
    /// default applies), as `""` does for every param but an optional string.
    #[serde(default)]
    #[schema(schema_with = param_value_schema)]
    pub params: BTreeMap<String, Box<RawValue>>,
}

/// Params as JSON values: strings, numbers and booleans are taken as their text; `null` means
/// "not given" (the default applies; a required param without one is reported missing). A
/// number keeps
/// the text it was sent as: the values are raw JSON (`RawValue`), never an `f64`, so
/// `12345678901234567890123` and `1.50` reach the run as written.
pub fn params_from_json(
    values: BTreeMap<String, Box<RawValue>>,
    pipeline: Option<&skiff_core::pipeline::Pipeline>,
) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (k, v) in values {
        let text = v.get().trim();
        // serde_json has checked the text: it is one whole JSON value.
        let value = match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(text).map_err(|e| e.to_string()),
            Some(b'-' | b'0'..=b'9' | b't' | b'f') => Ok(text.to_string()),
            // Left out; a name the pipeline does not declare is kept, to be reported unknown.
            Some(b'n') if pipeline.is_some_and(|p| p.param(&k).is_some()) => continue,
            Some(b'n') => Ok(String::new()),
            Some(b'[') => Err("expected a string, number or boolean, got a list".to_string()),
            _ => Err("expected a string, number or boolean, got an object".to_string()),
        };
        match value {
            Ok(v) => {
                out.insert(k, v);
            }
            Err(message) => errors.push(ParamError { param: k, message }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Start a run.
#[utoipa::path(post, path = "/api/pipelines/{name}/runs", tag = "runs",
    params(("name" = String, Path, description = "the pipeline's name")),
    request_body(content = TriggerBody, description = "a JSON object; `{}` runs with the defaults"),
    responses(
        (status = 201, description = "the new run (queued)", body = RunDto,
            headers(("location" = String, description = "the run's URL"))),
        (status = 400, description = "the body is not JSON, or the path is not UTF-8", body = ErrorBody),
        (status = 404, description = "no such pipeline", body = ErrorBody),
        (status = 409, description = "the pipeline is invalid, or does not allow manual runs", body = ErrorBody),
        (status = 413, description = "the body is over 256 KiB", body = ErrorBody),
        (status = 415, description = "the body is not sent as JSON", body = ErrorBody),
        (status = 422, description = "the body is not an object of this shape (`invalid_body`), or the params do not fit (`invalid_params`, with `fields`: unknown, wrong type, a NUL, a value over 32 KiB, over 256 KiB in all)", body = ErrorBody)))]
pub async fn trigger(
    Auth(principal): Auth,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<JsonObject<TriggerBody>, ApiError>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &name)?;
    let JsonObject(body) = body?;
    let given = params_from_json(body.params, entry.pipeline.as_deref())
        .map_err(ApiError::invalid_params)?;
    let run = state
        .dispatcher
        .trigger(&entry, &given, trigger_of(&principal, TriggerKind::Api))
        .await?;
    Ok(created(&run))
}

/// The most runs one page holds.
pub const MAX_RUNS_PAGE: u64 = 500;
/// A page's size when `limit` is not given.
pub const DEFAULT_RUNS_PAGE: u64 = 50;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only this pipeline's runs.
    pipeline: Option<String>,
    /// Only runs in this state.
    #[param(schema_with = run_status_schema)]
    status: Option<String>,
    /// The page's size: 1 to 500 (50 when absent); anything else is a 400.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// The `next` of the previous page.
    cursor: Option<String>,
}

/// Runs, newest first, a page at a time.
#[utoipa::path(get, path = "/api/runs", tag = "runs", params(RunsQuery),
    responses(
        (status = 200, description = "a page of runs", body = RunList),
        (status = 400, description = "an unknown status, a limit out of range, a bad cursor or an unknown parameter", body = ErrorBody)))]
pub async fn list_runs(
    _auth: Auth,
    State(state): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<RunList>, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<RunStatus>().map_err(|_| {
            ApiError::bad_request(format!(
                "unknown status `{s}`; one of: {}",
                RunStatus::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?),
    };
    let limit = check_limit(q.limit, DEFAULT_RUNS_PAGE, MAX_RUNS_PAGE)?;
    let page = state
        .store
        .list_runs(&RunQuery {
            pipeline: q.pipeline,
            status,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            cursor: q.cursor,
        })
        .await?;
    Ok(Json(RunList {
        runs: page.runs.iter().map(|r| run_dto(r, None)).collect(),
        next: page.next,
    }))
}

/// A run with its steps.
#[utoipa::path(get, path = "/api/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "the run's id")),
    responses(
        (status = 200, description = "the run, with `steps`", body = RunDto),
        (status = 404, description = "no such run", body = ErrorBody)))]
pub async fn get_run(
    _auth: Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunDto>, ApiError> {
    let run = load_run(&state, &id).await?;
    let steps = state.store.steps(&run.id).await?;
    let mut dto = run_dto(&run, Some(&steps));
    dto.waiting_for = crate::workers::waiting_for(&state, &run).await;
    Ok(Json(dto))
}

/// The most log bytes one read returns.
pub const MAX_LOG_READ: u64 = 1 << 20;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// The byte offset to read from (0 when absent).
    offset: Option<u64>,
    /// The most bytes to read: 1 to 1048576 (1 MiB, also the default); anything else is a 400.
    #[param(minimum = 1, maximum = 1048576)]
    limit: Option<u64>,
}

/// A run's log from a byte offset.
#[utoipa::path(get, path = "/api/runs/{id}/logs", tag = "logs",
    params(("id" = String, Path, description = "the run's id"), LogsQuery),
    responses(
        (status = 200, description = "log chunks", body = LogsDto),
        (status = 400, description = "an offset or limit that is not a number, a limit out of range, an unknown parameter", body = ErrorBody),
        (status = 404, description = "no such run", body = ErrorBody),
        (status = 416, description = "the offset is past the end of the log", body = ErrorBody)))]
pub async fn read_logs(
    _auth: Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<LogsDto>, ApiError> {
    let run = load_run(&state, &id).await?;
    let limit = check_limit(q.limit, MAX_LOG_READ, MAX_LOG_READ)?;
    let offset = q.offset.unwrap_or(0);
    let read = state
        .store
        .read_logs(
            &run.id,
            offset,
            usize::try_from(limit).unwrap_or(usize::MAX),
        )
        .await?;
    Ok(Json(LogsDto {
        offset,
        next_offset: read.next_offset,
        len: read.len,
        complete: run.status.is_terminal() && read.next_offset == read.len,
        chunks: read
            .chunks
            .iter()
            .map(|c| LogChunkDto {
                offset: c.offset,
                step: c.step,
                stream: c.stream.as_str(),
                at: c.at,
                text: String::from_utf8_lossy(&c.data).into_owned(),
            })
            .collect(),
    }))
}

/// How the stream sends log text.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only: the stream's handler reads the text itself
#[schema(rename_all = "lowercase")]
pub enum StreamFormat {
    /// Each `log` event's data is `{offset, step, text}`.
    Text,
    /// `html`: the chunk's lines as HTML, ANSI colours as classes (the web UI's view), in place
    /// of `text`.
    Html,
}

/// Follow a run live: Server-Sent Events. `log` (data `{offset, step, stream, at, text}`, or
/// `html` (a list of lines) in place of `text` with `format=html`; its `id` is the
/// offset after it), `step` (a step changed: a Step), `run` (the run changed: a Run) and `end`
/// (data `{status, offset}`: the run is over and the whole log was sent). A client that
/// reconnects sends the last id as `Last-Event-ID` and continues with no gap and no repeat.
#[utoipa::path(get, path = "/api/runs/{id}/logs/stream", tag = "logs",
    params(
        ("id" = String, Path, description = "the run's id"),
        ("offset" = Option<u64>, Query, description = "the byte offset to start from (0 when absent)"),
        ("format" = Option<StreamFormat>, Query, description = "`text` (the default) or `html`"),
        ("Last-Event-ID" = Option<u64>, Header, description = "resume after this event: its id, a log offset (wins over `offset`)")),
    responses(
        (status = 200, description = "the event stream, until the `end` event", content_type = "text/event-stream", body = String),
        (status = 400, description = "a bad offset, format or Last-Event-ID, or an unknown parameter", body = ErrorBody),
        (status = 404, description = "no such run", body = ErrorBody),
        (status = 416, description = "the offset is past the end of the log", body = ErrorBody)))]
pub async fn stream_logs(
    auth: Auth,
    state: State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<crate::sse::StreamQuery>, QueryRejection>,
) -> Response {
    crate::sse::stream_logs(auth, state, axum::extract::Path(id), headers, query)
        .await
        .into_response()
}

/// Cancel a run: its running step is stopped, its finally steps still run.
#[utoipa::path(post, path = "/api/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "the run's id")),
    responses(
        (status = 202, description = "the cancel is on its way", body = RunDto),
        (status = 404, description = "no such run", body = ErrorBody),
        (status = 409, description = "the run already ended", body = ErrorBody)))]
pub async fn cancel(
    Auth(principal): Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let run = load_run(&state, &id).await?;
    if run.status.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_ended",
            format!("run {} already ended ({})", run.id, run.status),
        ));
    }
    let run = state
        .store
        .request_cancel(&run.id, &format!("cancelled by {}", principal.actor()))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(run_dto(&run, None))).into_response())
}

/// Run again: the same pipeline snapshot and params, a new run.
#[utoipa::path(post, path = "/api/runs/{id}/rerun", tag = "runs",
    params(("id" = String, Path, description = "the run's id")),
    responses(
        (status = 201, description = "the new run", body = RunDto,
            headers(("location" = String, description = "the new run's URL"))),
        (status = 404, description = "no such run", body = ErrorBody),
        (status = 409, description = "the run's pipeline snapshot no longer loads", body = ErrorBody)))]
pub async fn rerun(
    Auth(principal): Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let run = load_run(&state, &id).await?;
    let new = state
        .dispatcher
        .rerun(&run, trigger_of(&principal, TriggerKind::Rerun))
        .await?;
    Ok(created(&new))
}

/// A service a run deployed, as the resources ledger knows it (its current container) and as its
/// engine says it is now (state, health, image, addresses).
#[derive(Serialize, ToSchema)]
pub struct ServiceDto {
    pub name: String,
    /// Its current container (`NAME-RUN-ATTEMPT`).
    pub container: String,
    /// The engine's ID (`docker info`).
    pub engine: Option<String>,
    /// When this version was deployed.
    pub since: DateTime<Utc>,
    /// The run that deployed it.
    pub run: Option<String>,
    pub pipeline: Option<String>,
    pub run_number: Option<u64>,
    /// When a temporary deploy is removed by the reaper.
    pub expires_at: Option<DateTime<Utc>>,
    /// What its engine says now: `running`, `stopped`, `missing` (the engine has no such
    /// container) or `unknown` (the engine could not be asked).
    pub state: String,
    /// Since when it is in that state (started, or stopped).
    pub state_since: Option<DateTime<Utc>>,
    /// More about the state: an exit code, why the engine could not be asked.
    pub state_note: Option<String>,
    /// The image's HEALTHCHECK verdict (`healthy`, `unhealthy`, `starting`), if it has one.
    pub health: Option<String>,
    /// The image the container runs, as the deploy named it.
    pub image: Option<String>,
    /// `http://HOST:PORT` for each published port.
    pub addresses: Vec<String>,
    /// The newest runs that acted on it (deploys, Stop, Start), newest first, at most 5.
    pub recent_runs: Vec<ServiceRunDto>,
}

/// A run that acted on a service.
#[derive(Serialize, ToSchema)]
pub struct ServiceRunDto {
    pub id: String,
    pub pipeline: String,
    pub number: u64,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceList {
    pub services: Vec<ServiceDto>,
}

/// How many recent runs a service lists.
const SERVICE_RUNS: usize = 5;

/// The services runs deployed and did not remove, by name, each with its current version.
/// `only`: that one service (none: all).
pub async fn services(state: &AppState, only: Option<&str>) -> Result<Vec<ServiceDto>, ApiError> {
    use skiff_core::ledger::{ResourceQuery, ResourceState};
    let records = state
        .store
        .resources(&ResourceQuery {
            service: only.map(str::to_string),
            states: vec![ResourceState::Live],
            ..Default::default()
        })
        .await?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    // Newest first: the first record of a service is its current version.
    for r in records {
        let Some(name) = r.service.clone() else {
            continue;
        };
        if r.kind != "container" || !seen.insert(name.clone()) {
            continue;
        }
        let run = match &r.run {
            Some(id) => state.store.get_run(id).await?,
            None => None,
        };
        let observed = match &state.engines {
            Some(engines) => {
                let target = r.external_id.as_deref().unwrap_or(&r.name);
                engines.observe(r.engine.as_deref(), target).await
            }
            None => crate::services::Observed {
                note: Some("this server asks no engine".into()),
                ..Default::default()
            },
        };
        out.push(ServiceDto {
            recent_runs: service_runs(state, &name).await?,
            name,
            container: r.name,
            engine: r.engine,
            since: r.created_at,
            run: r.run.map(|id| id.to_string()),
            pipeline: run.as_ref().map(|run| run.pipeline.clone()),
            run_number: run.as_ref().map(|run| run.number),
            expires_at: r.expires_at,
            state: observed.state.as_str().to_string(),
            state_since: observed.since,
            state_note: observed.note,
            health: observed.health,
            image: observed.image,
            addresses: observed.addresses,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The newest runs that acted on a service: those that deployed it (the ledger's records of
/// its containers) and its built-in Stop and Start runs.
async fn service_runs(state: &AppState, service: &str) -> Result<Vec<ServiceRunDto>, ApiError> {
    use skiff_core::ledger::ResourceQuery;
    let records = state
        .store
        .resources(&ResourceQuery {
            service: Some(service.to_string()),
            ..Default::default()
        })
        .await?;
    let mut runs: Vec<Run> = Vec::new();
    for r in records {
        if runs.len() >= SERVICE_RUNS {
            break;
        }
        let Some(id) = r.run else { continue };
        if runs.iter().any(|run| run.id == id) {
            continue;
        }
        if let Some(run) = state.store.get_run(&id).await? {
            runs.push(run);
        }
    }
    let own = state
        .store
        .list_runs(&RunQuery {
            pipeline: Some(format!("service-{service}")),
            status: None,
            limit: SERVICE_RUNS as u32,
            cursor: None,
        })
        .await?;
    runs.extend(own.runs);
    runs.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    runs.truncate(SERVICE_RUNS);
    Ok(runs
        .into_iter()
        .map(|r| ServiceRunDto {
            id: r.id.to_string(),
            pipeline: r.pipeline,
            number: r.number,
            status: r.status.as_str().to_string(),
            created_at: r.created_at,
        })
        .collect())
}

/// The services runs deployed (`docker/deploy`) and did not remove, by name, with the run that
/// deployed the current version.
#[utoipa::path(get, path = "/api/services", tag = "services",
    responses((status = 200, description = "the services", body = ServiceList)))]
pub async fn list_services(
    _auth: Auth,
    State(state): State<AppState>,
) -> Result<Json<ServiceList>, ApiError> {
    Ok(Json(ServiceList {
        services: services(&state, None).await?,
    }))
}

/// A record of the resources ledger: something a run created (or is about to: `creating`).
#[derive(Serialize, ToSchema)]
pub struct ResourceDto {
    /// skiff's own id for it.
    pub id: String,
    /// `container`, `image`...
    pub kind: String,
    /// A container's name, an image reference.
    pub name: String,
    /// The engine's ID (`docker info`).
    pub engine: Option<String>,
    pub service: Option<String>,
    pub run: Option<String>,
    /// `creating`, `live` or `removed`.
    pub state: String,
    /// The engine's own id, once it exists.
    pub external_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub hourly_price: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct ResourceList {
    pub resources: Vec<ResourceDto>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResourcesQuery {
    /// Only what this run created.
    run: Option<String>,
    /// Only this service's.
    service: Option<String>,
    /// Only records in this state: creating, live or removed.
    state: Option<String>,
}

/// The resources ledger, newest first: every container and image runs created, with its state.
#[utoipa::path(get, path = "/api/resources", tag = "services", params(ResourcesQuery),
    responses(
        (status = 200, description = "the records", body = ResourceList),
        (status = 400, description = "a bad run id, an unknown state or parameter", body = ErrorBody)))]
pub async fn list_resources(
    _auth: Auth,
    State(state): State<AppState>,
    Query(q): Query<ResourcesQuery>,
) -> Result<Json<ResourceList>, ApiError> {
    use skiff_core::ledger::{ResourceQuery, ResourceState};
    let run = match q.run.as_deref() {
        None | Some("") => None,
        Some(id) => Some(id.parse::<RunId>().map_err(ApiError::bad_request)?),
    };
    let states = match q.state.as_deref() {
        None | Some("") => Vec::new(),
        Some(s) => vec![s.parse::<ResourceState>().map_err(ApiError::bad_request)?],
    };
    let records = state
        .store
        .resources(&ResourceQuery {
            run,
            service: q.service.filter(|s| !s.is_empty()),
            engine: None,
            states,
        })
        .await?;
    Ok(Json(ResourceList {
        resources: records
            .into_iter()
            .map(|r| ResourceDto {
                id: r.id,
                kind: r.kind,
                name: r.name,
                engine: r.engine,
                service: r.service,
                run: r.run.map(|id| id.to_string()),
                state: r.state.to_string(),
                external_id: r.external_id,
                created_at: r.created_at,
                updated_at: r.updated_at,
                expires_at: r.expires_at,
                hourly_price: r.hourly_price,
            })
            .collect(),
    }))
}

/// Stops, starts or redeploys a service: a run to watch. Stop and start are built-in runs
/// (pipeline `service-NAME`, trigger `service`); redeploy is an exact rerun of the run that
/// deployed the current version.
pub async fn service_action(
    state: &AppState,
    principal: &crate::auth::Principal,
    name: &str,
    action: &str,
) -> Result<Run, ApiError> {
    let service = skiff_core::actions::docker::ServiceName::parse(name).map_err(|_| {
        ApiError::not_found(format!(
            "no service `{}`",
            name.chars().take(60).collect::<String>()
        ))
    })?;
    let current = services(state, Some(&service.0))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("no service `{}`", service.0)))?;
    use skiff_core::dispatch::ServiceAction;
    let run = match action {
        "stop" => {
            state
                .dispatcher
                .service_run(&service, ServiceAction::Stop, principal.actor())
                .await?
        }
        "start" => {
            state
                .dispatcher
                .service_run(&service, ServiceAction::Start, principal.actor())
                .await?
        }
        "redeploy" => {
            let gone = || {
                ApiError::conflict(format!(
                    "the run that deployed {} is no longer kept: run its pipeline again",
                    service.0
                ))
            };
            let id = current.run.as_deref().ok_or_else(gone)?;
            let run = load_run(state, id).await.map_err(|_| gone())?;
            state
                .dispatcher
                .rerun(&run, trigger_of(principal, TriggerKind::Rerun))
                .await?
        }
        other => {
            return Err(ApiError::not_found(format!(
                "no service action `{}` (stop, start, redeploy)",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    Ok(run)
}

/// Stop, start or redeploy a service: 201 with the run that does it (stop and start are
/// built-in runs with the trigger `service`; redeploy reruns the run that deployed the current
/// version, exactly).
#[utoipa::path(post, path = "/api/services/{name}/{action}", tag = "services",
    params(("name" = String, Path, description = "the service"),
        ("action" = String, Path, description = "stop, start or redeploy")),
    responses(
        (status = 201, description = "the run that does it", body = RunDto,
            headers(("location" = String, description = "the run's URL"))),
        (status = 404, description = "no such service or action", body = ErrorBody),
        (status = 409, description = "the run that deployed it is no longer kept", body = ErrorBody)))]
pub async fn act_on_service(
    Auth(principal): Auth,
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let run = service_action(&state, &principal, &name, &action).await?;
    Ok(created(&run))
}

/// API tokens, newest first (never their secrets).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    responses((status = 200, description = "the tokens", body = TokenList)))]
pub async fn list_tokens(
    _auth: Auth,
    State(state): State<AppState>,
) -> Result<Json<TokenList>, ApiError> {
    let tokens = state.auth.list_tokens().await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(token_dto).collect(),
    }))
}

/// The body of a token creation: a JSON object.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 64 visible characters.
    name: String,
    /// `read`, `run` (when absent) or `admin`.
    #[serde(default)]
    scope: Option<String>,
}

/// A token's scope as given (`run` when absent).
pub fn parse_scope(given: Option<&str>) -> Result<Scope, ApiError> {
    match given {
        None | Some("") => Ok(Scope::Run),
        Some(s) => s.parse().map_err(|message: String| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_scope", message)
        }),
    }
}

/// Checks a token's name: 1 to 64 visible characters.
pub fn check_token_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            "a token name has 1 to 64 visible characters",
        ));
    }
    Ok(name.to_string())
}

/// Create an API token; its secret is in this answer only.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens",
    request_body(content = NewToken, description = "a JSON object"),
    responses(
        (status = 201, description = "the token, with `token` holding its secret", body = CreatedTokenDto),
        (status = 400, description = "the body is not JSON", body = ErrorBody),
        (status = 413, description = "the body is over 256 KiB", body = ErrorBody),
        (status = 415, description = "the body is not sent as JSON", body = ErrorBody),
        (status = 422, description = "the body is not an object of this shape (`invalid_body`), the name is not 1 to 64 visible characters (`invalid_name`), or the scope is not read, run or admin (`invalid_scope`)", body = ErrorBody)))]
pub async fn create_token(
    _auth: Auth,
    State(state): State<AppState>,
    JsonObject(body): JsonObject<NewToken>,
) -> Result<Response, ApiError> {
    let name = check_token_name(&body.name)?;
    let scope = parse_scope(body.scope.as_deref())?;
    let secret = random_token("skiff_");
    let token = state
        .auth
        .create_token(&name, &hash_secret(&secret), scope)
        .await?;
    let TokenDto {
        id,
        name,
        scope,
        legacy: _,
        created_at,
        last_used_at,
        revoked_at,
    } = token_dto(&token);
    let dto = CreatedTokenDto {
        id,
        name,
        scope,
        created_at,
        last_used_at,
        revoked_at,
        token: secret,
    };
    Ok((StatusCode::CREATED, Json(dto)).into_response())
}

/// Revoke an API token: it stops working at once.
#[utoipa::path(post, path = "/api/tokens/{id}/revoke", tag = "tokens",
    params(("id" = String, Path, description = "the token's id")),
    responses(
        (status = 204, description = "revoked"),
        (status = 404, description = "no such active token", body = ErrorBody)))]
pub async fn revoke_token(
    _auth: Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.auth.revoke_token(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no active token `{id}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).expect("raw JSON")
    }

    #[test]
    fn params_keep_their_text() {
        let given: BTreeMap<String, Box<RawValue>> = [
            ("a", "12345678901234567890123"),
            ("b", "1.50"),
            ("c", "-0.5e-3"),
            ("d", r#""x\"y\u00e9""#),
            ("e", "true"),
            ("f", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), raw(v)))
        .collect();
        let out = params_from_json(given, None).expect("params");
        assert_eq!(out["a"], "12345678901234567890123");
        assert_eq!(out["b"], "1.50");
        assert_eq!(out["c"], "-0.5e-3");
        assert_eq!(out["d"], "x\"yé");
        assert_eq!((out["e"].as_str(), out["f"].as_str()), ("true", "false"));
        let bad: BTreeMap<String, Box<RawValue>> = [("l", "[1]"), ("o", "{}")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), raw(v)))
            .collect();
        let errors = params_from_json(bad, None).expect_err("bad");
        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.param.as_str(), e.message.rsplit(' ').next().unwrap_or("")))
            .collect();
        assert_eq!(got, [("l", "list"), ("o", "object")]);
    }

    #[test]
    fn a_trigger_body_keeps_number_text_through_the_object_parser() {
        let body: TriggerBody =
            crate::error::parse_object(br#"{"params": {"n": 12345678901234567890123, "x": 1.50}}"#)
                .expect("body");
        let out = params_from_json(body.params, None).expect("params");
        assert_eq!(out["n"], "12345678901234567890123");
        assert_eq!(out["x"], "1.50");
    }

    #[test]
    fn limits() {
        assert_eq!(check_limit(None, 50, 500).ok(), Some(50));
        assert_eq!(check_limit(Some(1), 50, 500).ok(), Some(1));
        assert_eq!(check_limit(Some(500), 50, 500).ok(), Some(500));
        for bad in [0, 501] {
            let e = check_limit(Some(bad), 50, 500).expect_err("out of range");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains("between 1 and 500"), "{}", e.message);
        }
    }
}
