//! The change feed across servers. Every script that changes something publishes
//! `ORIGIN KIND SUBJECT` on `skiff:d:changes`; each [`RedisStore`](crate::RedisStore) announces
//! its own changes to its followers at once (in the order it made them), and listens on a
//! pub/sub connection of its own for the others', which it numbers into the same local feed.
//! Its own messages come back too and are left out by their origin.
//!
//! When the subscription drops (Redis restarted, the network went away), it is made again by
//! itself, with a warning: changes published meanwhile are lost, and followers re-read what
//! they follow (a follower that falls behind does that anyway).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use skiff_core::run::RunId;
use skiff_core::store::{Change, ChangeKind, Subject};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::keys;

/// The local feed: numbered in the order changes are announced.
pub struct Feed {
    next: std::sync::Mutex<u64>,
    sender: broadcast::Sender<Change>,
}

impl Feed {
    pub fn new() -> Self {
        Feed {
            next: std::sync::Mutex::new(1),
            sender: broadcast::channel(1024).0,
        }
    }

    pub fn send(&self, subject: Subject, kind: ChangeKind) {
        // Numbered and sent under one lock, so numbers arrive in order.
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        // No receivers is fine: nobody is following.
        let _ = self.sender.send(Change {
            seq: *next,
            subject,
            kind,
        });
        *next += 1;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }
}

pub fn kind_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Status => "status",
        ChangeKind::Step => "step",
        ChangeKind::Log => "log",
        ChangeKind::Cancel => "cancel",
        ChangeKind::Deleted => "deleted",
        ChangeKind::Resource => "resource",
    }
}

fn kind_of(name: &str) -> Option<ChangeKind> {
    [
        ChangeKind::Status,
        ChangeKind::Step,
        ChangeKind::Log,
        ChangeKind::Cancel,
        ChangeKind::Deleted,
        ChangeKind::Resource,
    ]
    .into_iter()
    .find(|k| kind_name(*k) == name)
}

/// A published message: its origin, and the change.
pub fn parse(payload: &[u8]) -> Option<(&str, Subject, ChangeKind)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(3, ' ');
    let origin = parts.next()?;
    let kind = kind_of(parts.next()?)?;
    let subject = parts.next()?;
    let subject = if let Some(id) = subject.strip_prefix("r:") {
        Subject::Run(id.parse::<RunId>().ok()?)
    } else {
        Subject::Resource(subject.strip_prefix("x:")?.to_string())
    };
    Some((origin, subject, kind))
}

/// How often the subscription is checked with a PING (a connection that died silently).
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscribes to the change channel.
pub async fn subscribe(client: &redis::Client) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(keys::CHANGES).await?;
    Ok(pubsub)
}

/// Follows the change channel until `stop`, into `feed`, leaving out `origin`'s own messages;
/// subscribes again whenever the subscription drops.
pub async fn follow(
    client: redis::Client,
    first: redis::aio::PubSub,
    origin: String,
    feed: Arc<Feed>,
    stop: CancellationToken,
) {
    let mut pubsub = Some(first);
    let mut delay = Duration::from_millis(100);
    loop {
        if let Some(subscribed) = pubsub.take() {
            let (mut sink, mut stream) = subscribed.split();
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.reset();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    message = stream.next() => match message {
                        Some(message) => {
                            delay = Duration::from_millis(100);
                            match parse(message.get_payload_bytes()) {
                                Some((from, _, _)) if from == origin => {}
                                Some((_, subject, kind)) => feed.send(subject, kind),
                                None => tracing::warn!(
                                    payload = %String::from_utf8_lossy(message.get_payload_bytes()),
                                    "an unreadable message on skiff's change channel"
                                ),
                            }
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                            Ok(Ok(_)) => {}
                            _ => break,
                        }
                    }
                }
            }
            tracing::warn!(
                "the subscription to skiff's change feed in Redis was lost; subscribing again (changes made meanwhile are missed)"
            );
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        match subscribe(&client).await {
            Ok(again) => {
                tracing::info!("subscribed to skiff's change feed in Redis again");
                pubsub = Some(again);
            }
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to skiff's change feed in Redis failed; trying again");
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
