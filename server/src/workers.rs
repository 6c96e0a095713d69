//! Who executes runs: the workers the binary's `WorkersView` reports (the registry in Redis, or
//! the embedded server's own in-process workers), for the Workers page and `GET /api/workers`,
//! and why a queued run waits.

use std::collections::BTreeSet;

use async_trait::async_trait;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use skiff_core::run::{Run, RunStatus};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};

/// A worker as its registry knows it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub name: String,
    pub host: String,
    pub labels: BTreeSet<String>,
    pub version: String,
    pub actions: Vec<String>,
    pub secrets: Vec<String>,
    pub concurrency: u32,
    /// The in-process workers of a server.
    pub embedded: bool,
    pub started_at: DateTime<Utc>,
    pub last_beat: DateTime<Utc>,
    /// Its last beat is older than its lease.
    pub lost: bool,
    /// It takes every run whatever its labels (the embedded deployment's workers).
    pub takes_all: bool,
}

/// Where the server learns who the workers are; given by the binary.
#[async_trait]
pub trait WorkersView: Send + Sync + 'static {
    async fn workers(&self) -> Result<Vec<Seen>, String>;
}

#[derive(Serialize, ToSchema)]
pub struct WorkerDto {
    pub name: String,
    pub host: String,
    pub labels: Vec<String>,
    /// skiff's version.
    pub version: String,
    /// The actions it can execute.
    pub actions: Vec<String>,
    /// The names of the secrets it holds (never their values).
    pub secrets: Vec<String>,
    /// How many runs it executes at once.
    pub concurrency: u32,
    /// The in-process workers of a server.
    pub embedded: bool,
    pub started_at: DateTime<Utc>,
    pub last_beat: DateTime<Utc>,
    /// Its last beat is older than its lease: killed, cut off or stopped without leaving.
    pub lost: bool,
    /// The runs it holds now (ids).
    pub runs: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerDto>,
}

/// The workers: each with its labels, capabilities, last beat and the runs it holds.
#[utoipa::path(get, path = "/api/workers", tag = "workers",
    responses(
        (status = 200, description = "the workers", body = WorkerList),
        (status = 503, description = "the worker registry cannot be read", body = ErrorBody)))]
pub async fn list_workers(
    _auth: Auth,
    State(state): State<AppState>,
) -> Result<Json<WorkerList>, ApiError> {
    Ok(Json(WorkerList {
        workers: rows(&state).await?,
    }))
}

pub async fn rows(state: &AppState) -> Result<Vec<WorkerDto>, ApiError> {
    let Some(view) = &state.workers else {
        return Ok(Vec::new());
    };
    let seen = view.workers().await.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the worker registry cannot be read: {e}"),
        )
    })?;
    let running = running_runs(state).await?;
    Ok(seen
        .into_iter()
        .map(|w| WorkerDto {
            runs: running
                .iter()
                .filter(|r| r.claimed_by.as_deref() == Some(w.name.as_str()))
                .map(|r| r.id.to_string())
                .collect(),
            name: w.name,
            host: w.host,
            labels: w.labels.into_iter().collect(),
            version: w.version,
            actions: w.actions,
            secrets: w.secrets,
            concurrency: w.concurrency,
            embedded: w.embedded,
            started_at: w.started_at,
            last_beat: w.last_beat,
            lost: w.lost,
        })
        .collect())
}

async fn running_runs(state: &AppState) -> Result<Vec<Run>, ApiError> {
    let mut runs = Vec::new();
    let mut cursor = None;
    loop {
        let page = state
            .store
            .list_runs(&skiff_core::store::RunQuery {
                status: Some(RunStatus::Running),
                limit: 500,
                cursor,
                ..Default::default()
            })
            .await?;
        runs.extend(page.runs);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(runs),
        }
    }
}

/// Why a queued run waits, when no live worker can take it: "a worker with labels aws, docker".
/// `None` when one can (it is on its way), when the run is not queued, or when the workers are
/// not known.
pub async fn waiting_for(state: &AppState, run: &Run) -> Option<String> {
    if run.status != RunStatus::Queued {
        return None;
    }
    let view = state.workers.as_ref()?;
    let seen = view.workers().await.ok()?;
    let needs: BTreeSet<String> = skiff_core::pipeline::load(&run.source, &run.pipeline)
        .map(|p| p.runs_on.into_iter().collect())
        .unwrap_or_default();
    let served = seen
        .iter()
        .any(|w| !w.lost && (w.takes_all || needs.is_subset(&w.labels)));
    if served {
        return None;
    }
    Some(if needs.is_empty() {
        "a worker (none is alive)".to_string()
    } else {
        format!(
            "a worker with labels {}",
            needs.into_iter().collect::<Vec<_>>().join(", ")
        )
    })
}
