//! A connection that sends a command again when it could not be sent: after Redis restarts,
//! the first command on a `ConnectionManager` fails with "broken pipe" while it reconnects, and
//! a trigger would answer 500 for it. Only failures where the command cannot have reached Redis
//! (the socket was already closed, or not yet connected) are retried, so nothing runs twice.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// How often, and how long apart, an unsent command is tried again.
const TRIES: u32 = 4;
const PAUSE: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Resending(pub ConnectionManager);

/// Whether the command cannot have reached Redis.
fn unsent(e: &redis::RedisError) -> bool {
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    if let Some(io) = io {
        return matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::NotConnected
        );
    }
    let text = e.to_string();
    text.contains("broken pipe") || text.contains("not connected")
}

impl ConnectionLike for Resending {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut tried = 1;
            loop {
                match self.0.req_packed_command(cmd).await {
                    Err(e) if tried < TRIES && unsent(&e) => {
                        tried += 1;
                        tokio::time::sleep(PAUSE).await;
                    }
                    other => return other,
                }
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut tried = 1;
            loop {
                match self.0.req_packed_commands(pipeline, offset, count).await {
                    Err(e) if tried < TRIES && unsent(&e) => {
                        tried += 1;
                        tokio::time::sleep(PAUSE).await;
                    }
                    other => return other,
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}
