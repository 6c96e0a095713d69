//! The distributed queue: one Redis list per label set, taken with `BLMPOP`.
//!
//! A run's job goes on the list of its label set (its pipeline's `runs_on`, sorted:
//! `skiff:d:q:v1:docker,linux`; no labels: `skiff:d:q:v1:any`), and the set's name into
//! `skiff:d:queues`. A worker serves every list whose labels are a subset of its own, and takes
//! jobs with one blocking `BLMPOP` over all of them (and its own poke list, first), so a job
//! reaches an idle worker in one round trip, without polling. The job format's version is part
//! of the list's name: a worker never meets a job of a format it does not know.
//!
//! The queue delivers at least once; the Store makes it once: a worker's first act is claiming
//! the run (`queued -> running`, one atomic step), so a job taken twice (re-pushed by the
//! sweeper, or delivered again after a worker put it back) starts its run once. A job popped by a
//! worker that died before claiming is found by the sweeper ([`RedisQueue::requeue_missing`]):
//! a run still `queued` whose job is on no list gets a new one.
//!
//! When a push makes a label set known for the first time, every registered worker is poked
//! (an element on its `skiff:d:poke:NAME` list, which its `BLMPOP` watches), so it starts
//! serving the new list at once.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use skiff_core::dispatch::{JOB_VERSION, Queue, QueueError, RunJob};
use skiff_core::queue::JobHandler;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::workers::{POKE_PREFIX, WORKERS};

/// The set of label sets that have had jobs.
pub const QUEUES: &str = "skiff:d:queues";
const QUEUE_PREFIX: &str = "skiff:d:q:";
/// How long a `BLMPOP` blocks before the worker looks at the registered label sets again.
const BLOCK: Duration = Duration::from_secs(1);

const PUSH: &str = r#"
-- KEYS[1] the label set's list, KEYS[2] the set of label sets, KEYS[3] the workers' hash
-- ARGV[1] the job, ARGV[2] the label set's name, ARGV[3] the poke lists' prefix
redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  for _, name in ipairs(redis.call('HKEYS', KEYS[3])) do
    local poke = ARGV[3] .. name
    redis.call('RPUSH', poke, 'queues')
    redis.call('EXPIRE', poke, 60)
  end
end
return 1
"#;

/// The name of a label set's list (`v1:any`, `v1:docker,linux`), its labels sorted.
pub fn queue_name(labels: &[String]) -> String {
    if labels.is_empty() {
        format!("v{JOB_VERSION}:any")
    } else {
        format!("v{JOB_VERSION}:{}", labels.join(","))
    }
}

/// The labels a list's name stands for; `None` for a list of another job version.
fn labels_of_queue(name: &str) -> Option<BTreeSet<String>> {
    let rest = name.strip_prefix(&format!("v{JOB_VERSION}:"))?;
    if rest == "any" {
        return Some(BTreeSet::new());
    }
    Some(rest.split(',').map(str::to_string).collect())
}

fn backend(e: redis::RedisError) -> QueueError {
    QueueError(format!("redis: {e}"))
}

/// A connection of its own for blocking commands (a command queued behind a `BLMPOP` on a shared
/// connection would wait out the block), with a response timeout past the block.
pub async fn blocking_connection(
    client: &redis::Client,
) -> Result<MultiplexedConnection, redis::RedisError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Pushes jobs (the server's side of the queue).
#[derive(Clone)]
pub struct RedisQueue {
    conn: redis::aio::ConnectionManager,
    push: Arc<redis::Script>,
}

impl RedisQueue {
    pub fn new(conn: redis::aio::ConnectionManager) -> Self {
        RedisQueue {
            conn,
            push: Arc::new(redis::Script::new(PUSH)),
        }
    }

    /// Gives a new job to every run in `waiting` (queued runs, oldest first, with their
    /// labels) whose job is on no list; returns how many got one. Safe beside running workers:
    /// a run whose job was just taken gets a second one, which its claim makes harmless.
    pub async fn requeue_missing(
        &self,
        waiting: &[(String, Vec<String>)],
    ) -> Result<usize, QueueError> {
        if waiting.is_empty() {
            return Ok(0);
        }
        let mut conn = crate::conn::Resending(self.conn.clone());
        let names: Vec<String> = conn.smembers(QUEUES).await.map_err(backend)?;
        let mut queued = HashSet::new();
        for name in names {
            let jobs: Vec<String> = conn
                .lrange(format!("{QUEUE_PREFIX}{name}"), 0, -1)
                .await
                .map_err(backend)?;
            for job in jobs {
                if let Ok(job) = serde_json::from_str::<RunJob>(&job) {
                    queued.insert(job.run_id);
                }
            }
        }
        let mut pushed = 0;
        for (run, labels) in waiting {
            if queued.contains(run) {
                continue;
            }
            let id = run.parse().map_err(QueueError)?;
            self.push(RunJob::with_labels(&id, labels.clone())).await?;
            pushed += 1;
        }
        Ok(pushed)
    }

    /// How many jobs wait on each label set's list.
    pub async fn depths(&self) -> Result<Vec<(Vec<String>, u64)>, QueueError> {
        let mut conn = crate::conn::Resending(self.conn.clone());
        let names: Vec<String> = conn.smembers(QUEUES).await.map_err(backend)?;
        let mut out = Vec::new();
        for name in names {
            let Some(labels) = labels_of_queue(&name) else {
                continue;
            };
            let n: u64 = conn
                .llen(format!("{QUEUE_PREFIX}{name}"))
                .await
                .map_err(backend)?;
            out.push((labels.into_iter().collect(), n));
        }
        out.sort();
        Ok(out)
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn push(&self, job: RunJob) -> Result<(), QueueError> {
        let name = queue_name(&job.labels);
        let body = serde_json::to_string(&job).map_err(|e| QueueError(e.to_string()))?;
        let mut conn = crate::conn::Resending(self.conn.clone());
        let _: i64 = self
            .push
            .key(format!("{QUEUE_PREFIX}{name}"))
            .key(QUEUES)
            .key(WORKERS)
            .arg(body)
            .arg(name)
            .arg(POKE_PREFIX)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// A worker's side of the queue: which lists it serves, and how many runs it executes at once.
pub struct Consumer {
    pub client: redis::Client,
    /// The worker's name (its poke list).
    pub name: String,
    pub labels: BTreeSet<String>,
    pub slots: usize,
}

impl Consumer {
    /// Takes jobs and hands each to `handler` in a task of its own, at most `slots` at once,
    /// until `stop`; then waits for the handlers it started. A job taken while stopping, or one
    /// its handler gave back (`Err`: not claimed), is put back at the head of its list.
    pub async fn run(
        self,
        handler: Arc<dyn JobHandler>,
        stop: CancellationToken,
    ) -> Result<(), QueueError> {
        let free = Arc::new(Semaphore::new(self.slots));
        let running = TaskTracker::new();
        let poke = format!("{POKE_PREFIX}{}", self.name);
        let mut conn = None;
        let mut lists: Vec<String> = Vec::new();
        let mut rotate = 0usize;
        let mut stale = true;
        while !stop.is_cancelled() {
            let permit = tokio::select! {
                p = free.clone().acquire_owned() => p.map_err(|e| QueueError(e.to_string()))?,
                () = stop.cancelled() => break,
            };
            let c = match &mut conn {
                Some(c) => c,
                None => match blocking_connection(&self.client).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "the queue's connection to Redis failed; trying again");
                        drop(permit);
                        sleep_or_stop(Duration::from_secs(1), &stop).await;
                        continue;
                    }
                },
            };
            if stale {
                match self.servable(c).await {
                    Ok(found) => {
                        lists = found;
                        stale = false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the queues from Redis failed");
                        conn = None;
                        drop(permit);
                        sleep_or_stop(Duration::from_secs(1), &stop).await;
                        continue;
                    }
                }
            }
            // Lists are tried in order: start each take at the next one, so that one busy label
            // set does not starve another.
            rotate = rotate.wrapping_add(1);
            let mut keys = Vec::with_capacity(lists.len() + 1);
            keys.push(poke.clone());
            if !lists.is_empty() {
                let at = rotate % lists.len();
                keys.extend(lists[at..].iter().chain(&lists[..at]).cloned());
            }
            let count = 1 + free.available_permits();
            let taken: Option<(String, Vec<String>)> = match redis::cmd("BLMPOP")
                .arg(BLOCK.as_secs_f64())
                .arg(keys.len())
                .arg(&keys)
                .arg("LEFT")
                .arg("COUNT")
                .arg(count)
                .query_async(c)
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "taking jobs from Redis failed; reconnecting");
                    conn = None;
                    drop(permit);
                    sleep_or_stop(Duration::from_millis(200), &stop).await;
                    continue;
                }
            };
            let Some((list, jobs)) = taken else {
                // Nothing for a while: look for label sets that appeared meanwhile.
                stale = true;
                continue;
            };
            if list == poke {
                stale = true;
                continue;
            }
            let mut permit = Some(permit);
            for text in jobs {
                let job: RunJob = match serde_json::from_str(&text) {
                    Ok(job) => job,
                    Err(e) => {
                        tracing::error!(list, error = %e, "a job that does not parse; dropped");
                        continue;
                    }
                };
                let slot = match permit.take() {
                    Some(p) => p,
                    None => match free.clone().try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => {
                            give_back(&self.client, &list, &text).await;
                            continue;
                        }
                    },
                };
                if stop.is_cancelled() {
                    give_back(&self.client, &list, &text).await;
                    continue;
                }
                let handler = handler.clone();
                let client = self.client.clone();
                let list = list.clone();
                running.spawn(async move {
                    let _slot = slot;
                    if let Err(e) = handler.handle(job).await {
                        tracing::warn!(error = %e, "a job was given back");
                        give_back(&client, &list, &text).await;
                    }
                });
            }
        }
        running.close();
        running.wait().await;
        Ok(())
    }

    /// The lists of the label sets this worker can serve (each a subset of its labels).
    async fn servable(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<Vec<String>> {
        let names: Vec<String> = conn.smembers(QUEUES).await?;
        let mut lists: Vec<String> = names
            .into_iter()
            .filter(|name| labels_of_queue(name).is_some_and(|l| l.is_subset(&self.labels)))
            .map(|name| format!("{QUEUE_PREFIX}{name}"))
            .collect();
        lists.sort();
        Ok(lists)
    }
}

/// Puts a job back at the head of its list (best effort: the sweeper finds a run whose job is
/// lost).
async fn give_back(client: &redis::Client, list: &str, job: &str) {
    let put = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        conn.lpush::<_, _, ()>(list, job).await
    };
    if let Err(e) = put.await {
        tracing::warn!(list, error = %e, "putting a job back failed; the sweeper queues its run again");
    }
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_set_has_one_name_per_job_version() {
        assert_eq!(queue_name(&[]), "v1:any");
        let labels = vec!["docker".to_string(), "linux".to_string()];
        assert_eq!(queue_name(&labels), "v1:docker,linux");
        assert_eq!(
            labels_of_queue("v1:docker,linux"),
            Some(labels.into_iter().collect())
        );
        assert_eq!(labels_of_queue("v1:any"), Some(BTreeSet::new()));
        assert_eq!(labels_of_queue("v2:any"), None);
    }
}
