//! Worker presence: who serves the queue, with what, and whether they are alive.
//!
//! Each worker (a `skiff worker` process, or the in-process workers of a `skiff serve`) writes
//! what it is into `skiff:d:workers` (name -> JSON) and beats into `skiff:d:workers:beat` (name
//! -> the beat's time in ms, by Redis's clock: one clock for every host) every third of its
//! lease. A worker whose last beat is older than its lease is lost. A clean stop removes the
//! worker; a lost one is shown as lost for a day, then forgotten.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

/// name -> [`WorkerInfo`] as JSON.
pub const WORKERS: &str = "skiff:d:workers";
/// name -> the last beat, ms since the epoch by Redis's clock.
pub const BEATS: &str = "skiff:d:workers:beat";
/// A worker's poke list is this and its name.
pub const POKE_PREFIX: &str = "skiff:d:poke:";
/// A worker's last metrics (Prometheus text) are this and its name.
pub const METRICS_PREFIX: &str = "skiff:d:metrics:";
/// How long a worker's metrics are kept after its last report.
const METRICS_KEPT: Duration = Duration::from_secs(60);
/// How long a lost worker stays listed.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The record's format.
pub const WORKER_RECORD_VERSION: u32 = 1;

/// What a worker is and can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub v: u32,
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub labels: BTreeSet<String>,
    /// skiff's version.
    pub version: String,
    /// The job format it reads.
    pub job_version: u32,
    /// The actions it can execute (`docker/build`...).
    pub actions: Vec<String>,
    /// The names (never the values) of the secrets it holds.
    pub secrets: Vec<String>,
    pub concurrency: u32,
    /// The in-process workers of a server.
    pub embedded: bool,
    /// Its lease, in ms: it is lost when its last beat is older.
    pub lease_ms: u64,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

/// A registered worker as seen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub info: WorkerInfo,
    pub last_beat: chrono::DateTime<chrono::Utc>,
    pub lost: bool,
}

const REGISTER: &str = r#"
-- KEYS[1] workers, KEYS[2] beats; ARGV[1] name, ARGV[2] record, ARGV[3] lease ms,
-- ARGV[4] 1 to replace a live worker of that name
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local last = redis.call('ZSCORE', KEYS[2], ARGV[1])
if ARGV[4] ~= '1' and last and now - tonumber(last) < tonumber(ARGV[3]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"#;

const BEAT: &str = r#"
-- KEYS[1] workers, KEYS[2] beats; ARGV[1] name
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return -1
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"#;

const NOW: &str = r#"
local t = redis.call('TIME')
return t[1] * 1000 + math.floor(t[2] / 1000)
"#;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("a live worker is named `{0}` already (its last beat is within its lease)")]
    NameTaken(String),
    #[error("worker `{0}` is not registered (it was forgotten while away)")]
    Unknown(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a worker record: {0}")]
    Corrupt(String),
}

/// Registers, beats and lists workers.
#[derive(Clone)]
pub struct Registry {
    conn: redis::aio::ConnectionManager,
}

fn at_ms(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Registry {
    pub fn new(conn: redis::aio::ConnectionManager) -> Self {
        Registry { conn }
    }

    /// Registers `info`; refused while a live worker holds the name, unless `replace`.
    pub async fn register(&self, info: &WorkerInfo, replace: bool) -> Result<(), PresenceError> {
        let record =
            serde_json::to_string(info).map_err(|e| PresenceError::Corrupt(e.to_string()))?;
        let mut conn = crate::conn::Resending(self.conn.clone());
        let got: i64 = redis::Script::new(REGISTER)
            .key(WORKERS)
            .key(BEATS)
            .arg(&info.name)
            .arg(record)
            .arg(info.lease_ms)
            .arg(if replace { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        if got < 0 {
            return Err(PresenceError::NameTaken(info.name.clone()));
        }
        Ok(())
    }

    /// Says the worker is alive.
    pub async fn beat(&self, name: &str) -> Result<(), PresenceError> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        let got: i64 = redis::Script::new(BEAT)
            .key(WORKERS)
            .key(BEATS)
            .arg(name)
            .invoke_async(&mut conn)
            .await?;
        if got < 0 {
            return Err(PresenceError::Unknown(name.to_string()));
        }
        Ok(())
    }

    /// Removes a worker that stopped cleanly.
    pub async fn deregister(&self, name: &str) -> Result<(), PresenceError> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        redis::pipe()
            .atomic()
            .hdel(WORKERS, name)
            .zrem(BEATS, name)
            .del(format!("{POKE_PREFIX}{name}"))
            .del(format!("{METRICS_PREFIX}{name}"))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Keeps a worker's metrics (its Prometheus text) for the server's `/metrics`.
    pub async fn report_metrics(&self, name: &str, text: &str) -> Result<(), PresenceError> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        let _: () = conn
            .set_ex(
                format!("{METRICS_PREFIX}{name}"),
                text,
                METRICS_KEPT.as_secs(),
            )
            .await?;
        Ok(())
    }

    /// The metrics of the registered workers that reported some lately: (name, text).
    pub async fn metrics(&self) -> Result<Vec<(String, String)>, PresenceError> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        let names: Vec<String> = conn.hkeys(WORKERS).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names
            .iter()
            .map(|n| format!("{METRICS_PREFIX}{n}"))
            .collect();
        let texts: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(names
            .into_iter()
            .zip(texts)
            .filter_map(|(n, t)| Some((n, t?)))
            .collect())
    }

    /// Every registered worker, by name; workers lost for more than a day are forgotten here.
    pub async fn list(&self) -> Result<Vec<Presence>, PresenceError> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        let now: i64 = redis::Script::new(NOW).invoke_async(&mut conn).await?;
        let forget = now - FORGET_AFTER.as_millis() as i64;
        let gone: Vec<String> = conn.zrangebyscore(BEATS, "-inf", forget).await?;
        for name in &gone {
            let _: () = redis::pipe()
                .hdel(WORKERS, name)
                .zrem(BEATS, name)
                .query_async(&mut conn)
                .await?;
        }
        let records: Vec<(String, String)> = conn.hgetall(WORKERS).await?;
        let beats: Vec<(String, i64)> = conn.zrange_withscores(BEATS, 0, -1).await?;
        let beats: std::collections::HashMap<String, i64> = beats.into_iter().collect();
        let mut out = Vec::new();
        for (name, record) in records {
            let info: WorkerInfo = match serde_json::from_str(&record) {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(worker = name, error = %e, "a worker record that does not parse");
                    continue;
                }
            };
            let last = beats.get(&name).copied().unwrap_or(0);
            out.push(Presence {
                lost: now - last > info.lease_ms as i64,
                last_beat: at_ms(last),
                info,
            });
        }
        out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(out)
    }
}

/// Keeps a registered worker's beat every third of its lease until `stop`; a worker forgotten
/// while away (Redis lost its record) registers again.
pub async fn keep_beating(
    registry: Registry,
    info: WorkerInfo,
    stop: tokio_util::sync::CancellationToken,
) {
    let every = Duration::from_millis(info.lease_ms / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match registry.beat(&info.name).await {
            Ok(()) => {}
            Err(PresenceError::Unknown(_)) => {
                if let Err(e) = registry.register(&info, true).await {
                    tracing::warn!(error = %e, "registering the worker again failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "the worker's beat failed"),
        }
    }
}

/// A default worker name: the host, the process id and a random part.
pub fn default_name() -> String {
    let host = hostname();
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &random[random.len() - 6..]
    )
}

/// This host's name (from the kernel).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
