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
    /// The metrics each remote worker last reported (name, Prometheus text); a worker never
    /// serves HTTP, so the server's `/metrics` carries them.
    async fn metrics(&self) -> Vec<(String, String)> {
        Vec::new()
    }
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
    let running = skiff_core::store::runs_in(state.store.as_ref(), RunStatus::Running).await?;
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

/// Why a queued run waits, when no live worker can take it: "a worker with labels aws, docker".
/// `None` when one can (it is on its way), when the run is not queued, or when the workers are
/// not known.
pub async fn waiting_for(state: &AppState, run: &Run) -> Option<String> {
    if run.status != RunStatus::Queued {
        return None;
    }
    if let (true, Some(group)) = (run.held, &run.group) {
        // The run of its group that holds it: the active one that is not held itself.
        let mut ahead = None;
        for status in [RunStatus::Running, RunStatus::Queued] {
            if let Ok(runs) = skiff_core::store::runs_in(state.store.as_ref(), status).await
                && let Some(r) = runs
                    .into_iter()
                    .find(|r| r.group.as_ref() == Some(group) && !r.held && r.id != run.id)
            {
                ahead = Some(r);
                break;
            }
        }
        return Some(match ahead {
            Some(r) => format!("{} #{} of group {group}", r.pipeline, r.number),
            None => format!("the runs ahead of it in group {group}"),
        });
    }
    let view = state.workers.as_ref()?;
    let seen = view.workers().await.ok()?;
    let needs: Vec<String> = skiff_core::pipeline::load(&run.source, &run.pipeline)
        .map(|p| skiff_core::dispatch::needs(&p))
        .unwrap_or_default();
    let served = seen.iter().any(|w| {
        !w.lost
            && (w.takes_all || {
                let offers =
                    skiff_core::dispatch::offers(&w.labels, w.secrets.iter().map(String::as_str));
                needs.iter().all(|n| offers.contains(n))
            })
    });
    if served {
        return None;
    }
    Some(skiff_core::dispatch::describe_needs(&needs))
}

/// The server's own metrics with the workers' (each sample labelled `worker="NAME"`), every
/// metric family's samples kept together under its one HELP and TYPE, as the text format
/// requires.
pub fn merge_metrics(own: &str, workers: &[(String, String)]) -> String {
    #[derive(Default)]
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<String>,
    }
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, Family> = Default::default();
    let mut add = |text: &str, worker: Option<&str>| {
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = rest.split_whitespace().next().unwrap_or("").to_string();
                if !families.contains_key(&name) {
                    order.push(name.clone());
                }
                let f = families.entry(name.clone()).or_default();
                if line.starts_with("# HELP ") {
                    f.help.get_or_insert_with(|| line.to_string());
                } else {
                    f.kind.get_or_insert_with(|| line.to_string());
                }
                current = Some(name);
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let sample_name = &line[..name_end];
            let family = match &current {
                Some(c) if sample_name.starts_with(c.as_str()) => c.clone(),
                _ => sample_name.to_string(),
            };
            if !families.contains_key(&family) {
                order.push(family.clone());
            }
            let sample = match worker {
                None => line.to_string(),
                Some(w) => {
                    let label = format!(
                        "worker=\"{}\"",
                        w.replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n")
                    );
                    let rest = &line[name_end..];
                    match rest.strip_prefix('{') {
                        Some(r) if r.starts_with('}') => {
                            format!("{sample_name}{{{label}{r}")
                        }
                        Some(r) => format!("{sample_name}{{{label},{r}"),
                        None => format!("{sample_name}{{{label}}}{rest}"),
                    }
                }
            };
            families.entry(family).or_default().samples.push(sample);
        }
    };
    add(own, None);
    for (worker, text) in workers {
        add(text, Some(worker));
    }
    let mut out = String::with_capacity(own.len() * 2);
    for name in order {
        let Some(f) = families.remove(&name) else {
            continue;
        };
        for line in f.help.iter().chain(f.kind.iter()).chain(f.samples.iter()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_samples_join_their_family_with_its_name() {
        let own = "# HELP skiff_runs Runs.\n# TYPE skiff_runs gauge\nskiff_runs{status=\"queued\"} 1\n\n# TYPE skiff_step_duration_seconds histogram\nskiff_step_duration_seconds_bucket{le=\"1\"} 2\nskiff_step_duration_seconds_sum 0.5\nskiff_step_duration_seconds_count 2\n";
        let w = "# TYPE skiff_step_duration_seconds histogram\nskiff_step_duration_seconds_bucket{le=\"1\"} 7\nskiff_step_duration_seconds_sum 1\nskiff_step_duration_seconds_count 7\n# TYPE skiff_runs_finished_total counter\nskiff_runs_finished_total{} 7\n";
        let merged = merge_metrics(own, &[("w\"1".to_string(), w.to_string())]);
        assert_eq!(
            merged,
            "# HELP skiff_runs Runs.\n# TYPE skiff_runs gauge\nskiff_runs{status=\"queued\"} 1\n# TYPE skiff_step_duration_seconds histogram\nskiff_step_duration_seconds_bucket{le=\"1\"} 2\nskiff_step_duration_seconds_sum 0.5\nskiff_step_duration_seconds_count 2\nskiff_step_duration_seconds_bucket{worker=\"w\\\"1\",le=\"1\"} 7\nskiff_step_duration_seconds_sum{worker=\"w\\\"1\"} 1\nskiff_step_duration_seconds_count{worker=\"w\\\"1\"} 7\n# TYPE skiff_runs_finished_total counter\nskiff_runs_finished_total{worker=\"w\\\"1\"} 7\n"
        );
    }
}
