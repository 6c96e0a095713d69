//! `RedisStore`: the Store of the distributed deployment. Every change is one Lua script (run
//! with EVALSHA, loaded when Redis does not know it yet), so it is atomic and checked where the
//! data is: numbering, idempotency keys, claims and their fencing tokens, a run's end with its
//! steps. Decisions about time (leases, started and ended stamps, the ledger's times) use one
//! clock, Redis's own `TIME`, so workers on hosts whose clocks disagree still agree. The key
//! layout is in [`crate::keys`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script, Value};
use skiff_core::ledger::{NewResource, Resource, ResourceQuery, ResourceUpdate};
use skiff_core::run::{
    LogChunk, LogStream, NewRun, Run, RunId, RunStatus, StepRecord, StoredChunk,
};
use skiff_core::store::{
    Change, ChangeKind, Claim, Created, Delivery, DeliveryOutcome, DeliveryQuery, DeliveryResult,
    LogRead, Prune, Redelivery, RunPage, RunQuery, Store, StoreError, Subject, TakeOver,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::codec::{
    Fields, Result, backend, bytes, claim_from, corrupt, from_millis, millis, reply, resource_from,
    run_from, state_json, steps_from, text,
};
use crate::feed::{self, Feed};
use crate::keys;

/// A run's log is cut past this many bytes unless configured otherwise.
pub const DEFAULT_LOG_CAP: u64 = 64 << 20;

/// How to reach Redis. The credentials are given apart from the URL (the binary reads them
/// from the environment or a 0600 file, never from a flag that `ps` would show).
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`, `rediss://...` or `redis+unix:///path`.
    pub url: String,
    /// The ACL user (none: `default`).
    pub username: Option<String>,
    pub password: Option<String>,
    /// A run's log is cut past this many bytes: later appends are dropped and one line of
    /// skiff's says so.
    pub log_cap: u64,
    /// How long a command may wait for its answer (Redis's scripts are short; a slow answer is
    /// a Redis that is away).
    pub response_timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            username: None,
            password: None,
            log_cap: DEFAULT_LOG_CAP,
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("log_cap", &self.log_cap)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// The URL without a password in it, to show.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("scripts/common.lua"),
                include_str!(concat!("scripts/", $file))
            ))
        })
    };
}

static CREATE_RUN: LazyLock<Script> = script!("create_run.lua");
static CLAIM_RUN: LazyLock<Script> = script!("claim_run.lua");
static TAKE_OVER_RUN: LazyLock<Script> = script!("take_over_run.lua");
static RENEW_CLAIM: LazyLock<Script> = script!("renew_claim.lua");
static RELEASE_RUN: LazyLock<Script> = script!("release_run.lua");
static UPDATE_STEP: LazyLock<Script> = script!("update_step.lua");
static FINISH_RUN: LazyLock<Script> = script!("finish_run.lua");
static APPEND_LOGS: LazyLock<Script> = script!("append_logs.lua");
static READ_LOGS: LazyLock<Script> = script!("read_logs.lua");
static REQUEST_CANCEL: LazyLock<Script> = script!("request_cancel.lua");
static PRUNE_RUNS: LazyLock<Script> = script!("prune_runs.lua");
static RECORD_RESOURCE: LazyLock<Script> = script!("record_resource.lua");
static UPDATE_RESOURCE: LazyLock<Script> = script!("update_resource.lua");
static RECORD_DELIVERY: LazyLock<Script> = script!("record_delivery.lua");
static PRUNE_DELIVERIES: LazyLock<Script> = script!("prune_deliveries.lua");
static ADVANCE_SCHEDULE: LazyLock<Script> = script!("advance_schedule.lua");
pub(crate) static AUTH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/auth.lua")));

/// The Store (and [`AuthStore`](skiff_core::store::AuthStore)) on Redis. Cheap to clone: the
/// clones share one connection and one change feed.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    /// This Store's name on the change channel (its own messages come back, and are left out).
    origin: String,
    feed: Arc<Feed>,
    log_cap: u64,
    /// Stops following the change channel when the last clone goes.
    _follow: DropGuard,
}

impl RedisStore {
    /// Connects (a connection for commands, which reconnects by itself, and one subscribed to
    /// the change channel).
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore> {
        let shown = redacted(&config.url);
        let failed = |e: redis::RedisError| {
            StoreError::Backend(format!("connecting to Redis at {shown}: {e}"))
        };
        let mut info = config.url.as_str().into_connection_info().map_err(failed)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &config.password {
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(failed)?;
        Self::connect_with(client, config).await
    }

    /// Connects with a client made by the caller (with TLS roots of its own, say); `config`
    /// gives the rest (its URL only names Redis in messages).
    pub async fn connect_with(client: redis::Client, config: &RedisConfig) -> Result<RedisStore> {
        let shown = redacted(&config.url);
        let failed = |e: redis::RedisError| {
            StoreError::Backend(format!("connecting to Redis at {shown}: {e}"))
        };
        // The subscription first: one try, so a wrong address or password fails at once (the
        // connection manager retries its first connection with a backoff).
        let pubsub = tokio::time::timeout(config.connect_timeout, feed::subscribe(&client))
            .await
            .map_err(|_| StoreError::Backend(format!("connecting to Redis at {shown}: timed out")))?
            .map_err(failed)?;
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout));
        let conn = tokio::time::timeout(
            config.connect_timeout * 4,
            client.get_connection_manager_with_config(manager),
        )
        .await
        .map_err(|_| StoreError::Backend(format!("connecting to Redis at {shown}: timed out")))?
        .map_err(failed)?;
        let origin = uuid::Uuid::now_v7().simple().to_string();
        let feed = Arc::new(Feed::new());
        let stop = CancellationToken::new();
        tokio::spawn(feed::follow(
            client,
            pubsub,
            origin.clone(),
            feed.clone(),
            stop.clone(),
        ));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                origin,
                feed,
                log_cap: config.log_cap,
                _follow: stop.drop_guard(),
            }),
        })
    }

    pub(crate) fn conn(&self) -> crate::conn::Resending {
        crate::conn::Resending(self.inner.conn.clone())
    }

    fn origin(&self) -> &str {
        &self.inner.origin
    }

    fn changed(&self, id: &RunId, kind: ChangeKind) {
        self.inner.feed.send(Subject::Run(id.clone()), kind);
    }

    /// Why a claimed write was refused.
    fn refused(claim: &Claim, code: &str) -> StoreError {
        match code {
            "notfound" => StoreError::NotFound(claim.run.clone()),
            "stale" => StoreError::StaleClaim {
                id: claim.run.clone(),
                token: claim.token,
            },
            other => corrupt(format!("a script answered `{other}`")),
        }
    }

    /// Why a run did not move to `to`.
    fn not_moved(id: &RunId, code: &str, rest: Vec<Value>, to: RunStatus) -> StoreError {
        match code {
            "notfound" => StoreError::NotFound(id.clone()),
            "state" => match rest.into_iter().next().map(text) {
                Some(Ok(from)) => match from.parse::<RunStatus>() {
                    Ok(from) => StoreError::InvalidTransition {
                        id: id.clone(),
                        from,
                        to,
                    },
                    Err(e) => corrupt(format!("run status: {e}")),
                },
                Some(Err(e)) => e,
                None => corrupt("a script answered `state` without one"),
            },
            other => corrupt(format!("a script answered `{other}`")),
        }
    }

    /// The run hash a script answered after `ok`.
    fn answered_run(rest: Vec<Value>) -> Result<Fields> {
        let first = rest
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("a script answered no run"))?;
        Fields::from_value(first)
    }

    async fn hgetall(&self, key: &str) -> Result<Fields> {
        let map: HashMap<String, Vec<u8>> = self.conn().hgetall(key).await.map_err(backend)?;
        Ok(Fields::from_map(map))
    }

    /// Several hashes in one round trip (empty ones for keys that are gone).
    async fn hgetall_many(&self, keys: &[String]) -> Result<Vec<Fields>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.hgetall(key);
        }
        let maps: Vec<HashMap<String, Vec<u8>>> =
            pipe.query_async(&mut self.conn()).await.map_err(backend)?;
        Ok(maps.into_iter().map(Fields::from_map).collect())
    }

    async fn claimed(
        &self,
        script: &Script,
        claim: &Claim,
        args: Vec<Vec<u8>>,
    ) -> Result<Vec<Value>> {
        let mut invocation = script.prepare_invoke();
        invocation.key(keys::run(&claim.run));
        for arg in args {
            invocation.arg(arg);
        }
        let value: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        if code == "ok" {
            Ok(rest)
        } else {
            Err(Self::refused(claim, &code))
        }
    }
}

/// A lease in milliseconds, at most ten years (a time Redis's Lua numbers and chrono both hold
/// exactly).
fn lease_ms(lease: Duration) -> String {
    const MAX_LEASE_MS: u128 = 10 * 365 * 24 * 3600 * 1000;
    lease.as_millis().min(MAX_LEASE_MS).to_string()
}

fn opt_arg(value: Option<&str>) -> String {
    value.map_or_else(String::new, |v| format!("+{v}"))
}

/// What `read_logs` answers from the chunks the script gave: clipped to the requested range
/// and size as the SQLite Store clips them (only the first piece can be cut short of its
/// chunk's end, and between characters).
fn pieces(offset: u64, max_bytes: usize, len: u64, chunks: Vec<StoredChunk>) -> Vec<StoredChunk> {
    let mut out = Vec::new();
    let mut total = 0usize;
    for StoredChunk {
        offset: start,
        step,
        stream,
        at,
        data,
    } in chunks
    {
        if start >= len {
            break;
        }
        let end = (start + data.len() as u64).min(len);
        if end <= offset {
            continue;
        }
        let from = start.max(offset);
        let readable = (end - from) as usize;
        let mut size = readable;
        if total > 0 && total + size > max_bytes {
            break;
        }
        if total == 0 && size > max_bytes.max(1) {
            size = max_bytes.max(1);
        }
        total += size;
        let skip = (from - start) as usize;
        let mut piece = data[skip..skip + readable].to_vec();
        if size < readable {
            piece.truncate(size + 3);
            let cut = skiff_core::utf8::cut_at_char(&piece, size);
            piece.truncate(cut);
        }
        out.push(StoredChunk {
            offset: from,
            step,
            stream,
            at,
            data: piece,
        });
        if total >= max_bytes {
            break;
        }
    }
    out
}

/// A delivery's fields apart from those it is found by.
#[derive(serde::Serialize, serde::Deserialize)]
struct DeliveryMeta {
    v: u32,
    provider: String,
    event: String,
    verified: bool,
    outcome: DeliveryOutcome,
    reason: Option<String>,
    results: Vec<DeliveryResult>,
    headers: Vec<(String, String)>,
    body_len: u64,
    redelivery: Option<Redelivery>,
}

fn delivery_from(mut f: Fields) -> Result<Delivery> {
    f.version("a delivery")?;
    let meta: DeliveryMeta = serde_json::from_slice(f.raw("meta").unwrap_or_default())
        .map_err(|e| corrupt(format!("a delivery: {e}")))?;
    Ok(Delivery {
        key: f.text("key")?,
        hook: f.text("hook")?,
        id: f.text("id")?,
        provider: meta.provider,
        event: meta.event,
        received_at: f.time("received_at")?,
        verified: meta.verified,
        outcome: meta.outcome,
        reason: meta.reason,
        results: meta.results,
        headers: meta.headers,
        body: f.take_raw("body").unwrap_or_default(),
        body_len: meta.body_len,
        redelivery: meta.redelivery,
    })
}

fn page_limit(limit: u32) -> u32 {
    match limit {
        0 => 50,
        n => n.min(500),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_run(&self, new: NewRun) -> Result<Created> {
        let id = RunId::generate();
        let mut fields: Vec<(&str, String)> = vec![
            ("trigger_kind", new.trigger.kind.as_str().to_string()),
            ("trigger_actor", new.trigger.actor.clone()),
            (
                "params",
                serde_json::to_string(&new.params).unwrap_or_else(|_| "{}".into()),
            ),
            ("source", new.source.clone()),
        ];
        if let Some(rerun_of) = &new.rerun_of {
            fields.push(("rerun_of", rerun_of.to_string()));
        }
        if let Some(group) = &new.group {
            fields.push(("group", group.clone()));
            // The job its group's release writes carries them.
            fields.push((
                "labels",
                serde_json::to_string(&new.labels).unwrap_or_else(|_| "[]".into()),
            ));
        }
        let mut invocation = CREATE_RUN.prepare_invoke();
        invocation
            .key(keys::run(&id))
            .key(keys::steps(&id))
            .arg(id.as_str())
            .arg(&new.pipeline)
            .arg(opt_arg(new.idempotency_key.as_deref()))
            .arg(self.origin())
            .arg(fields.len());
        for (name, value) in &fields {
            invocation.arg(*name).arg(value);
        }
        for plan in &new.steps {
            let json = serde_json::to_string(&crate::codec::PlanJson {
                v: 1,
                id: plan.id.clone(),
                name: plan.name.clone(),
                phase: plan.phase.as_str().to_string(),
            })
            .unwrap_or_default();
            invocation.arg(plan.index).arg(json);
        }
        let value: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        let run = run_from(&Self::answered_run(rest)?)?;
        match code.as_str() {
            "ok" => {
                self.changed(&run.id, ChangeKind::Status);
                Ok(Created {
                    run,
                    created: true,
                    queued: false,
                })
            }
            "exists" => Ok(Created {
                run,
                created: false,
                queued: false,
            }),
            other => Err(corrupt(format!("create_run answered `{other}`"))),
        }
    }

    async fn get_run(&self, id: &RunId) -> Result<Option<Run>> {
        let fields = self.hgetall(&keys::run(id)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        run_from(&fields).map(Some)
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage> {
        let limit = page_limit(query.limit);
        let max = match &query.cursor {
            None => "+inf".to_string(),
            Some(c) => {
                let seq = c
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| StoreError::BadCursor(c.clone()))?;
                format!("({seq}")
            }
        };
        let index = match (&query.pipeline, query.status) {
            (Some(p), Some(s)) => keys::runs_of_in(p, s.as_str()),
            (Some(p), None) => keys::runs_of(p),
            (None, Some(s)) => keys::runs_in(s.as_str()),
            (None, None) => keys::ALL_RUNS.to_string(),
        };
        let ids: Vec<String> = self
            .conn()
            .zrevrangebyscore_limit(&index, max, "-inf", 0, limit as isize + 1)
            .await
            .map_err(backend)?;
        let more = ids.len() > limit as usize;
        let wanted: Vec<String> = ids
            .iter()
            .take(limit as usize)
            .map(|id| format!("{}run:{id}", keys::DATA))
            .collect();
        let mut runs = Vec::with_capacity(wanted.len());
        let mut last_seq = 0i64;
        for fields in self.hgetall_many(&wanted).await? {
            // Deleted since the index was read.
            if fields.is_empty() {
                continue;
            }
            last_seq = fields.int("seq")?;
            runs.push(run_from(&fields)?);
        }
        Ok(RunPage {
            runs,
            next: (more && last_seq > 0).then(|| last_seq.to_string()),
        })
    }

    async fn steps(&self, id: &RunId) -> Result<Vec<StepRecord>> {
        steps_from(&self.hgetall(&keys::steps(id)).await?)
    }

    async fn claim_run(&self, id: &RunId, worker: &str, lease: Duration) -> Result<(Run, Claim)> {
        let value: Value = CLAIM_RUN
            .key(keys::run(id))
            .arg(id.as_str())
            .arg(worker)
            .arg(lease_ms(lease))
            .arg(self.origin())
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        if code != "ok" {
            return Err(Self::not_moved(id, &code, rest, RunStatus::Running));
        }
        self.changed(id, ChangeKind::Status);
        claim_from(&Self::answered_run(rest)?)
    }

    async fn take_over_run(
        &self,
        id: &RunId,
        worker: &str,
        lease: Duration,
        when: TakeOver,
    ) -> Result<(Run, Claim)> {
        let value: Value = TAKE_OVER_RUN
            .key(keys::run(id))
            .arg(id.as_str())
            .arg(worker)
            .arg(lease_ms(lease))
            .arg(if when == TakeOver::Any { "1" } else { "0" })
            .arg(self.origin())
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        match code.as_str() {
            "ok" => {
                self.changed(id, ChangeKind::Status);
                claim_from(&Self::answered_run(rest)?)
            }
            "held" => {
                let mut rest = rest.into_iter();
                let worker = rest.next().map(text).transpose()?.unwrap_or_default();
                let until = rest
                    .next()
                    .map(text)
                    .transpose()?
                    .and_then(|t| t.parse::<i64>().ok())
                    .and_then(from_millis)
                    .ok_or_else(|| corrupt("a held run's lease"))?;
                Err(StoreError::Held {
                    id: id.clone(),
                    worker,
                    until,
                })
            }
            _ => Err(Self::not_moved(id, &code, rest, RunStatus::Running)),
        }
    }

    async fn release_run(&self, claim: &Claim) -> Result<Run> {
        let value: Value = RELEASE_RUN
            .key(keys::run(&claim.run))
            .key(keys::steps(&claim.run))
            .arg(claim.run.as_str())
            .arg(claim.token)
            .arg(self.origin())
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        match code.as_str() {
            "ok" => {
                self.changed(&claim.run, ChangeKind::Status);
                run_from(&Self::answered_run(rest)?)
            }
            "started" => Err(StoreError::InvalidTransition {
                id: claim.run.clone(),
                from: RunStatus::Running,
                to: RunStatus::Queued,
            }),
            other => Err(Self::refused(claim, other)),
        }
    }

    async fn renew_claim(&self, claim: &Claim, lease: Duration) -> Result<Claim> {
        let rest = self
            .claimed(
                &RENEW_CLAIM,
                claim,
                vec![
                    claim.token.to_string().into_bytes(),
                    lease_ms(lease).into_bytes(),
                ],
            )
            .await?;
        let until = rest
            .into_iter()
            .next()
            .map(text)
            .transpose()?
            .and_then(|t| t.parse::<i64>().ok())
            .and_then(from_millis)
            .ok_or_else(|| corrupt("a renewed lease"))?;
        Ok(Claim {
            expires_at: until,
            ..claim.clone()
        })
    }

    async fn update_step(&self, claim: &Claim, step: &StepRecord) -> Result<()> {
        let mut invocation = UPDATE_STEP.prepare_invoke();
        invocation
            .key(keys::run(&claim.run))
            .key(keys::steps(&claim.run))
            .arg(claim.run.as_str())
            .arg(claim.token)
            .arg(step.index)
            .arg(state_json(step))
            .arg(self.origin());
        let value: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, _) = reply(value)?;
        if code != "ok" {
            return Err(Self::refused(claim, &code));
        }
        self.changed(&claim.run, ChangeKind::Step);
        Ok(())
    }

    async fn append_logs(&self, claim: &Claim, chunks: &[LogChunk]) -> Result<u64> {
        let cap = self.inner.log_cap;
        let limit = if cap > 0 && cap.is_multiple_of(1 << 20) {
            format!("{} MiB", cap >> 20)
        } else {
            format!("{cap} bytes")
        };
        let note =
            format!("[skiff] the log reached its limit of {limit}: the rest of it is not kept\n");
        let mut invocation = APPEND_LOGS.prepare_invoke();
        invocation
            .key(keys::run(&claim.run))
            .key(keys::log(&claim.run))
            .arg(claim.run.as_str())
            .arg(claim.token)
            .arg(cap)
            .arg(self.origin())
            .arg(note);
        let mut any = false;
        for chunk in chunks.iter().filter(|c| !c.data.is_empty()) {
            any = true;
            invocation
                .arg(chunk.step.map(|s| s.to_string()).unwrap_or_default())
                .arg(chunk.stream.as_str())
                .arg(millis(chunk.at))
                .arg(chunk.data.as_slice());
        }
        let value: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        if code != "ok" {
            return Err(Self::refused(claim, &code));
        }
        let len = rest
            .into_iter()
            .next()
            .map(text)
            .transpose()?
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| corrupt("a log's length"))?;
        if any {
            self.changed(&claim.run, ChangeKind::Log);
        }
        Ok(len)
    }

    async fn finish_run(
        &self,
        claim: &Claim,
        steps: &[StepRecord],
        status: RunStatus,
        reason: Option<&str>,
    ) -> Result<Run> {
        if !RunStatus::Running.can_move_to(status) {
            return Err(StoreError::InvalidTransition {
                id: claim.run.clone(),
                from: RunStatus::Running,
                to: status,
            });
        }
        let mut invocation = FINISH_RUN.prepare_invoke();
        invocation
            .key(keys::run(&claim.run))
            .key(keys::steps(&claim.run))
            .arg(claim.run.as_str())
            .arg(claim.token)
            .arg(status.as_str())
            .arg(opt_arg(reason))
            .arg(self.origin());
        for step in steps {
            invocation.arg(step.index).arg(state_json(step));
        }
        let value: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        if code != "ok" {
            return Err(Self::refused(claim, &code));
        }
        for _ in steps {
            self.changed(&claim.run, ChangeKind::Step);
        }
        self.changed(&claim.run, ChangeKind::Status);
        run_from(&Self::answered_run(rest)?)
    }

    async fn read_logs(&self, id: &RunId, offset: u64, max_bytes: usize) -> Result<LogRead> {
        let value: Value = READ_LOGS
            .key(keys::run(id))
            .key(keys::log(id))
            .arg(offset)
            .arg(max_bytes)
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        let mut rest = rest.into_iter();
        let mut number = |what: &str| -> Result<u64> {
            rest.next()
                .map(text)
                .transpose()?
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| corrupt(format!("the log's {what}")))
        };
        let len = match code.as_str() {
            "ok" => number("length")?,
            "range" => {
                return Err(StoreError::OffsetOutOfRange {
                    offset,
                    len: number("length")?,
                });
            }
            "notfound" => return Err(StoreError::NotFound(id.clone())),
            "version" => {
                return Err(corrupt(format!(
                    "a chunk of run {id}'s log has a schema version this skiff does not know"
                )));
            }
            other => return Err(corrupt(format!("read_logs answered `{other}`"))),
        };
        let mut chunks = Vec::new();
        let items: Vec<Value> = rest.collect();
        for entry in items.chunks(5) {
            let [start, step, stream, at, data] = entry else {
                return Err(corrupt("a log entry is incomplete"));
            };
            let start = text(start.clone())?
                .parse::<u64>()
                .map_err(|_| corrupt("a log chunk's offset"))?;
            let step = text(step.clone())?;
            let step = if step.is_empty() {
                None
            } else {
                Some(
                    step.parse::<u32>()
                        .map_err(|_| corrupt("a log chunk's step"))?,
                )
            };
            let stream = text(stream.clone())?
                .parse::<LogStream>()
                .map_err(|e| corrupt(format!("log stream: {e}")))?;
            let at = text(at.clone())?
                .parse::<i64>()
                .ok()
                .and_then(from_millis)
                .ok_or_else(|| corrupt("a log chunk's time"))?;
            chunks.push(StoredChunk {
                offset: start,
                step,
                stream,
                at,
                data: bytes(data.clone())?,
            });
        }
        let chunks = pieces(offset, max_bytes, len, chunks);
        let next_offset = chunks
            .last()
            .map_or(offset, |c| c.offset + c.data.len() as u64);
        Ok(LogRead {
            chunks,
            next_offset,
            len,
        })
    }

    async fn request_cancel(&self, id: &RunId, reason: &str) -> Result<Run> {
        let value: Value = REQUEST_CANCEL
            .key(keys::run(id))
            .key(keys::steps(id))
            .arg(id.as_str())
            .arg(reason)
            .arg(self.origin())
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        match code.as_str() {
            "ok" => {
                self.changed(id, ChangeKind::Cancel);
                run_from(&Self::answered_run(rest)?)
            }
            "notfound" => Err(StoreError::NotFound(id.clone())),
            other => Err(corrupt(format!("request_cancel answered `{other}`"))),
        }
    }

    async fn prune_runs(&self, prune: &Prune) -> Result<Vec<RunId>> {
        // In batches: one script holds Redis, and everything queued behind it, only briefly.
        const BATCH: usize = 200;
        let mut deleted = Vec::new();
        loop {
            let ids: Vec<String> = PRUNE_RUNS
                .key(keys::runs_of(&prune.pipeline))
                .arg(&prune.pipeline)
                .arg(
                    prune
                        .finished_before
                        .map(|t| millis(t).to_string())
                        .unwrap_or_default(),
                )
                .arg(prune.keep_last.map(|k| k.to_string()).unwrap_or_default())
                .arg(BATCH)
                .arg(self.origin())
                .invoke_async(&mut self.conn())
                .await
                .map_err(backend)?;
            let done = ids.len() < BATCH;
            for id in ids {
                let id: RunId = id
                    .parse()
                    .map_err(|e: String| corrupt(format!("a pruned run: {e}")))?;
                self.changed(&id, ChangeKind::Deleted);
                deleted.push(id);
            }
            if done {
                return Ok(deleted);
            }
        }
    }

    async fn pipelines_with_runs(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .conn()
            .smembers(keys::PIPELINES)
            .await
            .map_err(backend)?;
        names.sort();
        Ok(names)
    }

    async fn record_resource(&self, claim: Option<&Claim>, new: NewResource) -> Result<Resource> {
        let mut fields: Vec<(&str, String)> =
            vec![("kind", new.kind.clone()), ("name", new.name.clone())];
        if let Some(engine) = &new.engine {
            fields.push(("engine", engine.clone()));
        }
        if let Some(service) = &new.service {
            fields.push(("service", service.clone()));
        }
        if let Some(run) = &new.run {
            fields.push(("run", run.to_string()));
        }
        if let Some(step) = new.step {
            fields.push(("step", step.to_string()));
        }
        if let Some(expires_at) = new.expires_at {
            fields.push(("expires_at", millis(expires_at).to_string()));
        }
        if let Some(price) = new.hourly_price {
            fields.push(("hourly_price", price.to_string()));
        }
        self.resource_script(&RECORD_RESOURCE, claim, &new.id, &fields)
            .await
    }

    async fn update_resource(
        &self,
        claim: Option<&Claim>,
        id: &str,
        update: &ResourceUpdate,
    ) -> Result<Resource> {
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(state) = update.state {
            fields.push(("state", state.as_str().to_string()));
        }
        if let Some(external_id) = &update.external_id {
            fields.push(("external_id", external_id.clone()));
        }
        if let Some(expires_at) = update.expires_at {
            fields.push(("expires_at", millis(expires_at).to_string()));
        }
        self.resource_script(&UPDATE_RESOURCE, claim, id, &fields)
            .await
    }

    async fn resources(&self, query: &ResourceQuery) -> Result<Vec<Resource>> {
        let ids: Vec<String> = if let Some(run) = &query.run {
            self.conn()
                .smembers(keys::resources_of_run(run))
                .await
                .map_err(backend)?
        } else if let Some(service) = &query.service {
            self.conn()
                .smembers(keys::resources_of_service(service))
                .await
                .map_err(backend)?
        } else {
            self.conn()
                .zrange(keys::ALL_RESOURCES, 0, -1)
                .await
                .map_err(backend)?
        };
        let wanted: Vec<String> = ids.iter().map(|id| keys::resource(id)).collect();
        let mut found = Vec::new();
        for fields in self.hgetall_many(&wanted).await? {
            if fields.is_empty() {
                continue;
            }
            let resource = resource_from(&fields)?;
            let keep = query
                .run
                .as_ref()
                .is_none_or(|r| resource.run.as_ref() == Some(r))
                && query
                    .service
                    .as_ref()
                    .is_none_or(|s| resource.service.as_ref() == Some(s))
                && query
                    .engine
                    .as_ref()
                    .is_none_or(|e| resource.engine.as_ref() == Some(e))
                && (query.states.is_empty() || query.states.contains(&resource.state));
            if keep {
                found.push(resource);
            }
        }
        found.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(found)
    }

    async fn record_delivery(&self, delivery: &Delivery) -> Result<()> {
        let meta = DeliveryMeta {
            v: 1,
            provider: delivery.provider.clone(),
            event: delivery.event.clone(),
            verified: delivery.verified,
            outcome: delivery.outcome,
            reason: delivery.reason.clone(),
            results: delivery.results.clone(),
            headers: delivery.headers.clone(),
            body_len: delivery.body_len,
            redelivery: delivery.redelivery.clone(),
        };
        let meta = serde_json::to_string(&meta)
            .map_err(|e| StoreError::Backend(format!("a delivery: {e}")))?;
        let _: i64 = RECORD_DELIVERY
            .key(keys::delivery(&delivery.key))
            .arg(&delivery.key)
            .arg(&delivery.hook)
            .arg(&delivery.id)
            .arg(millis(delivery.received_at))
            .arg(meta)
            .arg(delivery.body.as_slice())
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>> {
        let limit = page_limit(query.limit) as usize;
        let index = match (&query.id, &query.hook) {
            (Some(id), _) => keys::deliveries_with_id(id),
            (None, Some(hook)) => keys::deliveries_of_hook(hook),
            (None, None) => keys::DELIVERIES.to_string(),
        };
        // Newest first: by time, then by key (a sorted set orders equal scores by member), a
        // page at a time (the log holds a week; a page of the UI wants 50).
        let page = limit.max(50);
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut from = 0usize;
        loop {
            let keys_found: Vec<String> = self
                .conn()
                .zrevrange(&index, from as isize, (from + page - 1) as isize)
                .await
                .map_err(backend)?;
            if keys_found.is_empty() {
                break;
            }
            from += keys_found.len();
            // A delivery logged meanwhile moves the ranks on by one: none is answered twice.
            let wanted: Vec<String> = keys_found
                .iter()
                .filter(|k| seen.insert((*k).clone()))
                .map(|k| keys::delivery(k))
                .collect();
            for fields in self.hgetall_many(&wanted).await? {
                if fields.is_empty() {
                    continue;
                }
                let delivery = delivery_from(fields)?;
                if query.hook.as_ref().is_none_or(|h| *h == delivery.hook)
                    && query.id.as_ref().is_none_or(|i| *i == delivery.id)
                {
                    found.push(delivery);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(found)
    }

    async fn delivery(&self, key: &str) -> Result<Option<Delivery>> {
        let fields = self.hgetall(&keys::delivery(key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        delivery_from(fields).map(Some)
    }

    async fn prune_deliveries(&self, before: DateTime<Utc>) -> Result<u64> {
        const BATCH: u64 = 500;
        let mut total = 0;
        loop {
            let n: u64 = PRUNE_DELIVERIES
                .key(keys::DELIVERIES)
                .arg(millis(before))
                .arg(BATCH)
                .invoke_async(&mut self.conn())
                .await
                .map_err(backend)?;
            total += n;
            if n < BATCH {
                return Ok(total);
            }
        }
    }

    async fn schedule_mark(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        let fields = self.hgetall(&keys::schedule(key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        fields.version("a schedule mark")?;
        fields.time("slot").map(Some)
    }

    async fn advance_schedule(
        &self,
        key: &str,
        expected: Option<DateTime<Utc>>,
        slot: DateTime<Utc>,
    ) -> Result<bool> {
        let moved: i64 = ADVANCE_SCHEDULE
            .key(keys::schedule(key))
            .arg(expected.map(|t| millis(t).to_string()).unwrap_or_default())
            .arg(millis(slot))
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        Ok(moved == 1)
    }

    async fn status_counts(&self) -> Result<Vec<(RunStatus, u64)>> {
        let statuses: Vec<RunStatus> = crate::codec::statuses().collect();
        let mut pipe = redis::pipe();
        for status in &statuses {
            pipe.zcard(keys::runs_in(status.as_str()));
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn()).await.map_err(backend)?;
        Ok(statuses
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .collect())
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.feed.subscribe()
    }
}

impl RedisStore {
    async fn resource_script(
        &self,
        script: &Script,
        claim: Option<&Claim>,
        id: &str,
        fields: &[(&str, String)],
    ) -> Result<Resource> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(keys::resource(id))
            .arg(id)
            .arg(claim.map(|c| c.run.to_string()).unwrap_or_default())
            .arg(claim.map(|c| c.token.to_string()).unwrap_or_default())
            .arg(self.origin());
        for (name, value) in fields {
            invocation.arg(*name).arg(value);
        }
        let value: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        let (code, rest) = reply(value)?;
        match (code.as_str(), claim) {
            ("ok", _) => {
                self.inner
                    .feed
                    .send(Subject::Resource(id.to_string()), ChangeKind::Resource);
                resource_from(&Self::answered_run(rest)?)
            }
            ("missing", _) => Err(StoreError::ResourceNotFound(id.to_string())),
            (code, Some(claim)) => Err(Self::refused(claim, code)),
            (other, None) => Err(corrupt(format!("a ledger script answered `{other}`"))),
        }
    }
}
