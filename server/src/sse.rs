//! Following a run live over Server-Sent Events.
//!
//! Events: `log` (a chunk of the log; its id is the offset after it, so a reconnecting client
//! resumes with `Last-Event-ID`), `step` (a step changed), `run` (the run changed) and `end`
//! (the run is over and the whole log was sent). Memory per follower is bounded: the producer
//! reads at most one slice of log ahead of what the client has taken.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use skiff_core::run::RunId;
use skiff_core::store::Store;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};

use crate::AppState;
use crate::api::{load_run, run_dto, step_dto};
use crate::auth::Auth;
use crate::error::ApiError;

/// The most log bytes in one `log` event.
const SLICE: usize = 128 << 10;
/// How often a follower looks at the run even when told nothing (a safety net).
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    offset: Option<u64>,
    /// `html` sends each chunk's lines as HTML (ANSI colours as classes) instead of text.
    format: Option<String>,
}

pub async fn stream_logs(
    _auth: Auth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query?;
    let run = load_run(&state, &id).await?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| ApiError::bad_request("Last-Event-ID must be a log offset"))
        });
    let offset = match resume {
        Some(r) => r?,
        None => q.offset.unwrap_or(0),
    };
    if offset > run.log_len {
        return Err(skiff_core::store::StoreError::OffsetOutOfRange {
            offset,
            len: run.log_len,
        }
        .into());
    }
    let html = match q.format.as_deref() {
        None | Some("text") => false,
        Some("html") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown format `{other}` (text or html)"
            )));
        }
    };
    let (tx, rx) = mpsc::channel::<Event>(4);
    let shutdown = state.shutdown.clone();
    let follower = follow(state.store.clone(), run.id.clone(), offset, tx, html);
    tokio::spawn(async move {
        tokio::select! {
            () = follower => {}
            () = shutdown.cancelled() => {}
        }
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Sends the run's log from `offset` on, then its changes, until the run ends or the client
/// goes away (a send fails).
async fn follow(
    store: Arc<dyn Store>,
    id: RunId,
    mut offset: u64,
    tx: mpsc::Sender<Event>,
    html: bool,
) {
    let mut changes = store.changes();
    let mut sent_steps: HashMap<u32, (String, u32)> = HashMap::new();
    let mut sent_status: Option<String> = None;
    let mut colour = crate::ansi::Carry::default();
    loop {
        // The log, up to where it is now.
        loop {
            let read = match store.read_logs(&id, offset, SLICE).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(run_id = %id, error = %e, "reading a log to stream failed");
                    return;
                }
            };
            if read.chunks.is_empty() {
                break;
            }
            for chunk in &read.chunks {
                // Send whole lines: a slice that ends inside a line stops at its last newline,
                // and the rest of that line comes with the next read (a line longer than a slice
                // is sent in pieces).
                let bytes = match memchr::memrchr(b'\n', &chunk.data) {
                    Some(end) if end + 1 < chunk.data.len() => &chunk.data[..=end],
                    _ => &chunk.data[..],
                };
                let text = String::from_utf8_lossy(bytes);
                let mut data = json!({
                    "offset": chunk.offset,
                    "step": chunk.step,
                    "stream": chunk.stream.as_str(),
                    "at": chunk.at,
                });
                // Each line once: as text, or (the web UI) as HTML.
                if html {
                    data["html"] = json!(colour.lines_to_html(&text));
                } else {
                    data["text"] = json!(text);
                }
                let next = chunk.offset + bytes.len() as u64;
                if tx
                    .send(
                        Event::default()
                            .event("log")
                            .id(next.to_string())
                            .data(data.to_string()),
                    )
                    .await
                    .is_err()
                {
                    return;
                }
                offset = next;
                if bytes.len() < chunk.data.len() {
                    break;
                }
            }
        }
        // Steps and the run.
        let (run, steps) = match (store.get_run(&id).await, store.steps(&id).await) {
            (Ok(Some(run)), Ok(steps)) => (run, steps),
            _ => return,
        };
        for step in &steps {
            let key = (step.status.as_str().to_string(), step.attempt);
            if sent_steps.get(&step.index) != Some(&key) {
                sent_steps.insert(step.index, key);
                let data = serde_json::to_string(&step_dto(step)).unwrap_or_default();
                if tx
                    .send(Event::default().event("step").data(data))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let status_key = format!("{}{}", run.status, run.cancel_requested);
        if sent_status.as_deref() != Some(&status_key) {
            sent_status = Some(status_key);
            let data = serde_json::to_string(&run_dto(&run, None)).unwrap_or_default();
            if tx
                .send(Event::default().event("run").data(data))
                .await
                .is_err()
            {
                return;
            }
        }
        if run.log_len > offset {
            continue;
        }
        if run.status.is_terminal() {
            let _ = tx
                .send(
                    Event::default().event("end").data(
                        json!({ "status": run.status.as_str(), "offset": offset }).to_string(),
                    ),
                )
                .await;
            return;
        }
        // Wait until the run changes (or the safety tick), or the client leaves.
        let wait = async {
            loop {
                match changes.recv().await {
                    Ok(changed) if changed.run() == Some(&id) => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            () = wait => {}
            () = tokio::time::sleep(RECHECK) => {}
            () = tx.closed() => return,
        }
    }
}
