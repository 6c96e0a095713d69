//! The embedded queue against a real SQLite file: every pushed job reaches the handler once, and
//! a run made through the Store carries its job in its own transaction.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_core::dispatch::{Queue, RunJob};
use skiff_core::queue::{JobHandler, QUEUE_NAME, SqliteQueue};
use skiff_core::run::{NewRun, Phase, RunId, StepPlan, Trigger, TriggerKind};
use skiff_core::store::{SqliteStore, Store};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

struct Record {
    seen: Mutex<Vec<String>>,
    done: tokio::sync::Notify,
}

impl Record {
    fn new() -> Arc<Self> {
        Arc::new(Record {
            seen: Mutex::new(Vec::new()),
            done: tokio::sync::Notify::new(),
        })
    }

    /// Waits up to `limit` until the run ids seen so far satisfy `enough`.
    async fn wait_until(&self, limit: Duration, what: &str, enough: impl Fn(&[String]) -> bool) {
        let wait = async {
            while !enough(&self.seen.lock().expect("lock")) {
                self.done.notified().await;
            }
        };
        tokio::time::timeout(limit, wait).await.expect(what);
    }
}

#[async_trait::async_trait]
impl JobHandler for Record {
    async fn handle(&self, job: RunJob) -> Result<(), String> {
        let mut seen = self.seen.lock().map_err(|e| e.to_string())?;
        seen.push(job.run_id);
        self.done.notify_one();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_handled_once_under_its_own_queue_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("skiff.db"))
        .await
        .expect("store");
    let queue = SqliteQueue::open(store.writer(), 4).await.expect("queue");
    let handler = Record::new();
    let shutdown = CancellationToken::new();
    let worker = queue.spawn_workers(2, handler.clone(), shutdown.clone());
    let mut ids: Vec<String> = (0..60).map(|_| RunId::generate().to_string()).collect();
    for (i, id) in ids.iter().enumerate() {
        queue
            .push(RunJob {
                v: skiff_core::dispatch::JOB_VERSION,
                run_id: id.clone(),
                pushed_at_us: 0,
                labels: Vec::new(),
            })
            .await
            .expect("push");
        if i % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    handler
        .wait_until(Duration::from_secs(20), "every job is handled", |seen| {
            seen.len() >= ids.len()
        })
        .await;
    let mut seen = handler.seen.lock().expect("lock").clone();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "each job exactly once");
    let types: Vec<String> = sqlx::query("SELECT DISTINCT job_type FROM Jobs")
        .fetch_all(&mut *store.writer().lock().await)
        .await
        .expect("jobs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types,
        vec![QUEUE_NAME.to_string()],
        "the queue name is skiff's, not a Rust type name"
    );
    shutdown.cancel();
    worker.await.expect("the worker stops");
    // Every job was acknowledged as done (by the job's own id) by the time the
    // worker stopped.
    let done: i64 =
        sqlx::query("SELECT COUNT(*) FROM Jobs WHERE status = 'Done' AND done_at IS NOT NULL")
            .fetch_one(&mut *store.writer().lock().await)
            .await
            .expect("count")
            .get(0);
    assert_eq!(done, 60);
    // Finished jobs go by age: none is an hour old yet; backdated, they go.
    assert_eq!(
        queue
            .remove_finished(Duration::from_secs(3600))
            .await
            .expect("clean"),
        0
    );
    sqlx::query(
        "UPDATE Jobs SET done_at = done_at - 7200 WHERE id IN (SELECT id FROM Jobs LIMIT 10)",
    )
    .execute(&mut *store.writer().lock().await)
    .await
    .expect("backdate");
    assert_eq!(
        queue
            .remove_finished(Duration::from_secs(3600))
            .await
            .expect("clean"),
        10
    );
}

fn new_run(key: Option<&str>) -> NewRun {
    NewRun {
        pipeline: "p".into(),
        trigger: Trigger {
            kind: TriggerKind::Api,
            actor: "tester".into(),
        },
        params: BTreeMap::new(),
        source: "name: p\nsteps:\n  - run: echo\n".into(),
        steps: vec![StepPlan {
            index: 0,
            id: "s0".into(),
            name: "Step 0".into(),
            phase: Phase::Main,
        }],
        rerun_of: None,
        idempotency_key: key.map(str::to_string),
        group: None,
        labels: Vec::new(),
    }
}

async fn jobs_of(store: &SqliteStore) -> Vec<String> {
    sqlx::query("SELECT job ->> 'run_id' FROM Jobs WHERE job_type = ?1 ORDER BY id")
        .bind(QUEUE_NAME)
        .fetch_all(&mut *store.writer().lock().await)
        .await
        .expect("jobs")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// With the queue open on the Store's writer, a new run's job is written in the run's own
/// transaction: the Dispatcher pushes nothing more, a repeated key writes no second job, and the
/// worker is woken and takes every run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_carries_its_job_in_its_own_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("skiff.db"))
        .await
        .expect("store");
    // Before a queue is open, the Store writes runs only.
    let alone = store.create_run(new_run(None)).await.expect("create");
    assert!(alone.created && !alone.queued);
    let queue = SqliteQueue::open(store.writer(), 4).await.expect("queue");
    assert!(jobs_of(&store).await.is_empty());

    let mut made = Vec::new();
    for i in 0..20 {
        let key = (i % 2 == 0).then(|| format!("k{i}"));
        let created = store
            .create_run(new_run(key.as_deref()))
            .await
            .expect("create");
        assert!(created.created && created.queued, "run {i}: {created:?}");
        made.push(created.run.id.to_string());
        if let Some(key) = key {
            let again = store.create_run(new_run(Some(&key))).await.expect("repeat");
            assert!(!again.created && !again.queued);
            assert_eq!(again.run.id, created.run.id);
        }
    }
    assert_eq!(
        jobs_of(&store).await,
        made,
        "one job per new run, none for a repeat"
    );

    let handler = Record::new();
    let shutdown = CancellationToken::new();
    let worker = queue.spawn_workers(2, handler.clone(), shutdown.clone());
    handler
        .wait_until(
            Duration::from_secs(20),
            "every run's job is handled",
            |seen| seen.len() >= made.len(),
        )
        .await;
    // A run made while the worker waits wakes it (well before its half-second safety tick).
    let late = store.create_run(new_run(None)).await.expect("create");
    let woke = std::time::Instant::now();
    let late_id = late.run.id.to_string();
    handler
        .wait_until(Duration::from_secs(5), "the late run is handled", |seen| {
            seen.contains(&late_id)
        })
        .await;
    assert!(
        woke.elapsed() < Duration::from_millis(400),
        "{:?}",
        woke.elapsed()
    );
    made.push(late_id);
    let mut seen = handler.seen.lock().expect("lock").clone();
    seen.sort();
    made.sort();
    assert_eq!(seen, made, "each run's job exactly once");
    shutdown.cancel();
    worker.await.expect("the worker stops");
}
