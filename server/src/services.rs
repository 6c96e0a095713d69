//! Services as their engines see them now, and the Services page kept live.
//!
//! The server does not talk to Docker itself (bollard stays in skiff-docker): whoever composes
//! the server gives it an [`EngineView`] (`skiff serve` gives one over skiff-docker), which
//! inspects a service's current container on the engine the ledger names. Without one, every
//! service's state is `unknown`.
//!
//! [`live`] follows the change feed: whenever a resource changes or a run starts or ends (and
//! every few seconds, for what the engine does on its own: a container that died), the list is
//! rendered again and sent when it differs from what the page has.

use std::convert::Infallible;
use std::time::Duration;

use async_trait::async_trait;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use skiff_core::store::ChangeKind;
use tokio::sync::{broadcast, mpsc};

use crate::AppState;

/// How often the live list looks at the engines when the change feed says nothing.
const RECHECK: Duration = Duration::from_secs(3);

/// A container's state as its engine says it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineState {
    Running,
    Stopped,
    /// The engine answered and has no such container.
    Missing,
    /// The engine could not be asked (unreachable, or not one this server reaches).
    #[default]
    Unknown,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Running => "running",
            EngineState::Stopped => "stopped",
            EngineState::Missing => "missing",
            EngineState::Unknown => "unknown",
        }
    }
}

/// What an engine says of one container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub state: EngineState,
    /// The image's HEALTHCHECK verdict (`healthy`, `unhealthy`, `starting`); None without one.
    pub health: Option<String>,
    /// The image it was made from, as the deploy named it.
    pub image: Option<String>,
    /// Where it answers: `http://HOST:PORT`, one per published port.
    pub addresses: Vec<String>,
    /// Since when it is in its state (started, or stopped).
    pub since: Option<DateTime<Utc>>,
    /// More about the state: an exit code, why the engine could not be asked.
    pub note: Option<String>,
}

/// Asks engines about containers.
#[async_trait]
pub trait EngineView: Send + Sync {
    /// The container `container` (an ID or a name) on the engine the ledger records as
    /// `engine` (its ID; None: the local one).
    async fn observe(&self, engine: Option<&str>, container: &str) -> Observed;
}

/// Sends `render()`'s HTML as a `list` event whenever it changes, until the client goes away or
/// the server stops.
pub fn live<F, Fut>(
    state: AppState,
    render: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    F: Fn(AppState) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let (tx, rx) = mpsc::channel::<Event>(2);
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut changes = state.store.changes();
        let mut sent: Option<String> = None;
        let follow = async {
            loop {
                if let Some(html) = render(state.clone()).await
                    && sent.as_deref() != Some(html.as_str())
                {
                    if tx
                        .send(Event::default().event("list").data(&html))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent = Some(html);
                }
                let wait = async {
                    loop {
                        match changes.recv().await {
                            Ok(c)
                                if matches!(c.kind, ChangeKind::Resource | ChangeKind::Status) =>
                            {
                                return;
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                };
                tokio::select! {
                    () = wait => {
                        // A deploy writes a few records in a row: one render for them all.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while changes.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(RECHECK) => {}
                    () = tx.closed() => return,
                }
            }
        };
        tokio::select! {
            () = follow => {}
            () = shutdown.cancelled() => {}
        }
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
