//! The REST API: JSON in and out, shapes converted by hand from the domain types.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use skiff_core::catalog::Entry;
use skiff_core::pipeline::{ParamError, Pipeline, StepAction};
use skiff_core::run::{Run, RunId, RunStatus, StepRecord, Trigger, TriggerKind};
use skiff_core::store::{ApiToken, RunQuery};

use crate::AppState;
use crate::auth::{Auth, hash_secret, random_token};
use crate::error::ApiError;

// ---- wire types ----

#[derive(Serialize)]
pub struct DiagnosticDto {
    pub line: u32,
    pub column: u32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

#[derive(Serialize)]
pub struct ParamDto {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub default: Option<String>,
    pub description: Option<String>,
    pub options: Vec<String>,
    pub required: bool,
}

#[derive(Serialize)]
pub struct PipelineDto {
    pub name: String,
    pub file: String,
    pub valid: bool,
    pub description: Option<String>,
    pub diagnostics: Vec<DiagnosticDto>,
    pub params: Vec<ParamDto>,
    pub triggers: Value,
    pub steps: Vec<Value>,
}

pub fn pipeline_dto(entry: &Entry) -> PipelineDto {
    let p: Option<&Pipeline> = entry.pipeline.as_deref();
    PipelineDto {
        name: entry.name.clone(),
        file: entry.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        valid: p.is_some(),
        description: p.and_then(|p| p.description.clone()),
        diagnostics: entry
            .diagnostics
            .iter()
            .map(|d| DiagnosticDto { line: d.pos.line, column: d.pos.col, message: d.message.clone(), help: d.help.clone() })
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
        triggers: p.map_or(Value::Null, |p| {
            json!({
                "manual": p.on.manual,
                "webhook": p.on.webhook.as_ref().map(|w| json!({ "events": w.events, "branches": w.branches })),
                "schedules": p.on.schedules.iter().map(|s| json!({
                    "cron": s.cron,
                    "timezone": s.timezone.map(|t| t.name().to_string()),
                    "params": s.params.iter().cloned().collect::<BTreeMap<_, _>>(),
                })).collect::<Vec<_>>(),
            })
        }),
        steps: p
            .map(|p| {
                p.all_steps()
                    .map(|s| {
                        json!({
                            "id": s.id,
                            "name": s.name,
                            "phase": s.phase.as_str(),
                            "uses": match &s.action { StepAction::Uses { action, .. } => Some(action.name), StepAction::Run { .. } => None },
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[derive(Serialize)]
pub struct StepDto {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub phase: &'static str,
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

#[derive(Serialize)]
pub struct RunDto {
    pub id: String,
    pub pipeline: String,
    pub number: u64,
    pub status: &'static str,
    pub trigger: Value,
    pub params: BTreeMap<String, String>,
    pub rerun_of: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub reason: Option<String>,
    pub log_len: u64,
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepDto>>,
}

pub fn run_dto(r: &Run, steps: Option<&[StepRecord]>) -> RunDto {
    RunDto {
        id: r.id.to_string(),
        pipeline: r.pipeline.clone(),
        number: r.number,
        status: r.status.as_str(),
        trigger: json!({ "kind": r.trigger.kind.as_str(), "actor": r.trigger.actor }),
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
        steps: steps.map(|s| s.iter().map(step_dto).collect()),
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

// ---- handlers ----

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

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
    let text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

pub async fn list_pipelines(_auth: Auth, State(state): State<AppState>) -> Json<Value> {
    let catalog = state.catalog.current();
    let list: Vec<PipelineDto> = catalog.entries().map(|e| pipeline_dto(e)).collect();
    Json(json!({ "pipelines": list }))
}

pub async fn get_pipeline(
    _auth: Auth,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PipelineDto>, ApiError> {
    Ok(Json(pipeline_dto(&*entry(&state, &name)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerBody {
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
}

/// Params as JSON values: strings, numbers and booleans are taken as their text.
pub fn params_from_json(
    values: BTreeMap<String, Value>,
) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (k, v) in values {
        match v {
            Value::String(s) => {
                out.insert(k, s);
            }
            Value::Number(n) => {
                out.insert(k, n.to_string());
            }
            Value::Bool(b) => {
                out.insert(k, b.to_string());
            }
            other => errors.push(ParamError {
                param: k,
                message: format!(
                    "expected a string, number or boolean, got {}",
                    json_kind(&other)
                ),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
        _ => "a value",
    }
}

pub async fn trigger(
    Auth(principal): Auth,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<TriggerBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &name)?;
    if entry.pipeline.as_ref().is_some_and(|p| !p.on.manual) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "manual_disabled",
            format!("pipeline `{name}` does not allow manual runs (on.manual: false)"),
        ));
    }
    let Json(body) = body?;
    let given = params_from_json(body.params).map_err(|fields| ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "invalid_params",
        message: "the params do not fit the pipeline".into(),
        fields,
    })?;
    let run = state
        .dispatcher
        .trigger(&entry, &given, trigger_of(&principal, TriggerKind::Api))
        .await?;
    Ok(created(&run))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    pipeline: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list_runs(
    _auth: Auth,
    State(state): State<AppState>,
    query: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
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
    if q.limit.is_some_and(|l| l == 0 || l > 500) {
        return Err(ApiError::bad_request("limit must be between 1 and 500"));
    }
    let page = state
        .store
        .list_runs(&RunQuery {
            pipeline: q.pipeline,
            status,
            limit: q.limit.unwrap_or(50),
            cursor: q.cursor,
        })
        .await?;
    let runs: Vec<RunDto> = page.runs.iter().map(|r| run_dto(r, None)).collect();
    Ok(Json(json!({ "runs": runs, "next": page.next })))
}

pub async fn get_run(
    _auth: Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunDto>, ApiError> {
    let run = load_run(&state, &id).await?;
    let steps = state.store.steps(&run.id).await?;
    Ok(Json(run_dto(&run, Some(&steps))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    offset: Option<u64>,
    limit: Option<usize>,
}

/// The most log bytes one read returns.
pub const MAX_LOG_READ: usize = 1 << 20;

pub async fn read_logs(
    _auth: Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let run = load_run(&state, &id).await?;
    let limit = q.limit.unwrap_or(MAX_LOG_READ).clamp(1, MAX_LOG_READ);
    let offset = q.offset.unwrap_or(0);
    let read = state.store.read_logs(&run.id, offset, limit).await?;
    let chunks: Vec<Value> = read
        .chunks
        .iter()
        .map(|c| json!({ "offset": c.offset, "step": c.step, "text": String::from_utf8_lossy(&c.data) }))
        .collect();
    Ok(Json(json!({
        "offset": offset,
        "next_offset": read.next_offset,
        "len": read.len,
        "complete": run.status.is_terminal() && read.next_offset == read.len,
        "chunks": chunks,
    })))
}

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

fn token_dto(t: &ApiToken) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "created_at": t.created_at,
        "last_used_at": t.last_used_at,
        "revoked_at": t.revoked_at,
    })
}

pub async fn list_tokens(
    _auth: Auth,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state.auth.list_tokens().await?;
    Ok(Json(
        json!({ "tokens": tokens.iter().map(token_dto).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
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

pub async fn create_token(
    _auth: Auth,
    State(state): State<AppState>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let name = check_token_name(&body.name)?;
    let secret = random_token("skiff_");
    let token = state
        .auth
        .create_token(&name, &hash_secret(&secret))
        .await?;
    let mut dto = token_dto(&token);
    dto["token"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(dto)).into_response())
}

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
