//! Password attempts counted in Redis (`skiff:auth:throttle:ADDR`, `skiff:auth:failures`:
//! sorted sets of attempt ids by time, Redis's clock), so that servers sharing a Redis share the
//! login throttle. Under `skiff:auth:`: a worker's Redis user never reaches them.

use std::time::Duration;

use redis::aio::ConnectionManager;

const ADDR_PREFIX: &str = "skiff:auth:throttle:";
const FAILURES: &str = "skiff:auth:failures";

const RESERVE: &str = r#"
-- KEYS[1] the address's attempts; ARGV[1] window ms, ARGV[2] allowed, ARGV[3] attempt id
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return window - (now - tonumber(oldest[2]))
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return -1
"#;

const FAILED: &str = r#"
-- KEYS[1] the failures; ARGV[1] window ms, ARGV[2] attempt id
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"#;

const RECENT: &str = r#"
-- KEYS[1] the failures; ARGV[1] window ms
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"#;

/// The attempt counts in Redis.
#[derive(Clone)]
pub struct Attempts {
    conn: ConnectionManager,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Attempts {
    pub fn new(conn: ConnectionManager) -> Self {
        Attempts { conn }
    }

    /// Counts attempt `id` against `key` unless `allowed` were made within `window`; otherwise
    /// `Ok(Err(wait))`.
    pub async fn reserve(
        &self,
        key: &str,
        id: &str,
        allowed: usize,
        window: Duration,
    ) -> redis::RedisResult<Result<(), Duration>> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        let wait: i64 = redis::Script::new(RESERVE)
            .key(format!("{ADDR_PREFIX}{key}"))
            .arg(ms(window))
            .arg(allowed)
            .arg(id)
            .invoke_async(&mut conn)
            .await?;
        Ok(if wait < 0 {
            Ok(())
        } else {
            Err(Duration::from_millis(wait.unsigned_abs()))
        })
    }

    pub async fn forget(&self, key: &str, id: &str) -> redis::RedisResult<()> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        redis::cmd("ZREM")
            .arg(format!("{ADDR_PREFIX}{key}"))
            .arg(id)
            .query_async(&mut conn)
            .await
    }

    pub async fn failed(&self, id: &str, window: Duration) -> redis::RedisResult<()> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        redis::Script::new(FAILED)
            .key(FAILURES)
            .arg(ms(window))
            .arg(id)
            .invoke_async(&mut conn)
            .await
    }

    pub async fn recent_failures(&self, window: Duration) -> redis::RedisResult<usize> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        redis::Script::new(RECENT)
            .key(FAILURES)
            .arg(ms(window))
            .invoke_async(&mut conn)
            .await
    }
}
