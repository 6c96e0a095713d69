//! What `skiff serve --redis` and `skiff worker` share: the Store on Redis, this process's
//! workers registered and beating, taking jobs from the label sets they serve, and the sweeper
//! that gives a waiting run whose job was lost a new one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skiff_core::run::RunStatus;
use skiff_redis::queue::{Consumer, RedisQueue};
use skiff_redis::redis;
use skiff_redis::workers::{Registry, WorkerInfo, keep_beating};
use tokio_util::sync::CancellationToken;

use crate::redis_args::Redis;
use crate::runs::{Handler, labels_of};
use skiff_core::store::runs_in;

/// The Store on Redis (both its halves: runs and credentials).
pub async fn open_store(redis: &Redis) -> anyhow::Result<skiff_redis::RedisStore> {
    let mut config = skiff_redis::RedisConfig::new(redis.url.clone());
    config.username = redis.username.clone();
    config.password = redis.password.clone();
    skiff_redis::RedisStore::connect_with(redis.client.clone(), &config)
        .await
        .context("opening the Store on Redis")
}

pub async fn manager(redis: &Redis) -> anyhow::Result<redis::aio::ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    redis::aio::ConnectionManager::new_with_config(redis.client.clone(), config)
        .await
        .context("connecting to Redis")
}

/// What this process's workers are, for the registry.
pub fn info(handler: &Handler, concurrency: u16, embedded: bool) -> WorkerInfo {
    WorkerInfo {
        v: skiff_redis::workers::WORKER_RECORD_VERSION,
        name: handler.config.name.clone(),
        host: skiff_redis::workers::hostname(),
        pid: std::process::id(),
        labels: handler.labels.clone().unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        job_version: skiff_core::dispatch::JOB_VERSION,
        actions: skiff_core::actions::ACTIONS
            .iter()
            .map(|a| a.name().to_string())
            .collect(),
        secrets: handler.config.secrets.names().map(str::to_string).collect(),
        concurrency: u32::from(concurrency),
        embedded,
        lease_ms: u64::try_from(handler.config.lease.as_millis()).unwrap_or(u64::MAX),
        started_at: chrono::Utc::now(),
    }
}

/// Registers this process's workers, keeps their beat, and takes jobs for them until
/// `stop_taking`; returns when the runs it started have ended.
pub async fn work(
    redis: &Redis,
    handler: Arc<Handler>,
    concurrency: u16,
    embedded: bool,
    stop_taking: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let registry = Registry::new(manager(redis).await?);
    let info = info(&handler, concurrency, embedded);
    registry
        .register(&info, false)
        .await
        .context("registering the worker")?;
    let beat_stop = CancellationToken::new();
    let beating = tokio::spawn(keep_beating(
        registry.clone(),
        info.clone(),
        beat_stop.clone(),
    ));
    let consumer = Consumer {
        client: redis.client.clone(),
        name: info.name.clone(),
        labels: skiff_core::dispatch::offers(&info.labels, info.secrets.iter().map(String::as_str)),
        slots: usize::from(concurrency),
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = consumer.run(handler, stop_taking).await {
            tracing::error!(error = %e, "the worker's queue failed");
        }
        beat_stop.cancel();
        let _ = beating.await;
        if let Err(e) = registry.deregister(&info.name).await {
            tracing::warn!(error = %e, "removing the worker from the registry failed");
        }
    }))
}

/// The labels `skiff serve`'s in-process workers and `skiff worker` take: those given, plus
/// `docker` when this machine's engine answers.
pub async fn labels(
    given: &[String],
    tools: &skiff_worker::actions::Tools,
    extra: &[&str],
) -> BTreeSet<String> {
    let mut labels: BTreeSet<String> = given
        .iter()
        .flat_map(|l| l.split(','))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    labels.extend(extra.iter().map(|l| l.to_string()));
    if tools.engine().await.is_ok() {
        labels.insert("docker".into());
    }
    labels
}

/// Every `every`, gives the runs waiting for longer than `after` whose job is on no list a new
/// one (a worker that died between taking a job and claiming its run).
pub async fn keep_jobs(
    store: Arc<dyn skiff_core::store::Store>,
    queue: RedisQueue,
    every: Duration,
    after: Duration,
    stop: CancellationToken,
) {
    each(every, &stop, || async {
        let waiting = match runs_in(store.as_ref(), RunStatus::Queued).await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "listing the waiting runs failed");
                return;
            }
        };
        let now = chrono::Utc::now();
        let old: Vec<(String, Vec<String>)> = waiting
            .iter()
            .filter(|r| !r.held && (now - r.created_at).to_std().unwrap_or_default() >= after)
            .map(|r| (r.id.to_string(), labels_of(r)))
            .collect();
        match queue.requeue_missing(&old).await {
            Ok(0) => {}
            Ok(n) => eprintln!("skiff: {n} waiting runs had lost their jobs; queued them again"),
            Err(e) => tracing::warn!(error = %e, "looking for lost jobs failed"),
        }
    })
    .await;
}

/// Calls `f` every `period` until `stop`.
async fn each<F, Fut>(period: Duration, stop: &CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        f().await;
    }
}

/// A registered worker as the Workers view shows it.
pub fn seen(
    info: WorkerInfo,
    last_beat: chrono::DateTime<chrono::Utc>,
    lost: bool,
    takes_all: bool,
) -> skiff_server::workers::Seen {
    skiff_server::workers::Seen {
        name: info.name,
        host: info.host,
        labels: info.labels,
        version: info.version,
        actions: info.actions,
        secrets: info.secrets,
        concurrency: info.concurrency,
        embedded: info.embedded,
        started_at: info.started_at,
        last_beat,
        lost,
        takes_all,
    }
}

/// The Workers view on the registry in Redis.
pub struct RegistryView(pub Registry);

#[async_trait::async_trait]
impl skiff_server::workers::WorkersView for RegistryView {
    async fn workers(&self) -> Result<Vec<skiff_server::workers::Seen>, String> {
        let list = self.0.list().await.map_err(|e| e.to_string())?;
        Ok(list
            .into_iter()
            .map(|p| seen(p.info, p.last_beat, p.lost, false))
            .collect())
    }

    async fn metrics(&self) -> Vec<(String, String)> {
        self.0.metrics().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the workers' metrics failed");
            Vec::new()
        })
    }
}

/// Reports this worker's metrics to Redis every `every` until `stop` (a worker serves no HTTP:
/// the server's `/metrics` carries them).
pub async fn report_metrics(
    registry: Registry,
    name: String,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    every: Duration,
    stop: CancellationToken,
) {
    each(every, &stop, || async {
        if let Err(e) = registry.report_metrics(&name, &handle.render()).await {
            tracing::warn!(error = %e, "reporting the worker's metrics failed");
        }
    })
    .await;
}

/// The Workers view of the embedded deployment: its own in-process workers, which take every
/// run.
pub struct EmbeddedView(pub skiff_server::workers::Seen);

#[async_trait::async_trait]
impl skiff_server::workers::WorkersView for EmbeddedView {
    async fn workers(&self) -> Result<Vec<skiff_server::workers::Seen>, String> {
        let mut me = self.0.clone();
        me.last_beat = chrono::Utc::now();
        Ok(vec![me])
    }
}

/// The login throttle's counts in Redis, shared by every server on it.
pub struct SharedAttempts(pub skiff_redis::throttle::Attempts);

#[async_trait::async_trait]
impl skiff_server::auth::AttemptLog for SharedAttempts {
    async fn reserve(
        &self,
        key: &str,
        id: &str,
        allowed: usize,
        window: Duration,
    ) -> Result<Result<(), Duration>, String> {
        self.0
            .reserve(key, id, allowed, window)
            .await
            .map_err(|e| e.to_string())
    }

    async fn forget(&self, key: &str, id: &str) -> Result<(), String> {
        self.0.forget(key, id).await.map_err(|e| e.to_string())
    }

    async fn failed(&self, id: &str, window: Duration) -> Result<(), String> {
        self.0.failed(id, window).await.map_err(|e| e.to_string())
    }

    async fn recent_failures(&self, window: Duration) -> Result<usize, String> {
        self.0
            .recent_failures(window)
            .await
            .map_err(|e| e.to_string())
    }
}
