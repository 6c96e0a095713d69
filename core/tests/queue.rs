//! The embedded queue against a real SQLite file: every pushed job reaches the handler once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_core::dispatch::{Queue, RunJob};
use skiff_core::queue::{JobHandler, QUEUE_NAME, SqliteQueue};
use skiff_core::run::RunId;
use skiff_core::store::SqliteStore;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

struct Record {
    seen: Mutex<Vec<String>>,
    done: tokio::sync::Notify,
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
    let handler = Arc::new(Record {
        seen: Mutex::new(Vec::new()),
        done: tokio::sync::Notify::new(),
    });
    let shutdown = CancellationToken::new();
    let worker = queue.spawn_workers(2, handler.clone(), shutdown.clone());
    let mut ids: Vec<String> = (0..60).map(|_| RunId::generate().to_string()).collect();
    for (i, id) in ids.iter().enumerate() {
        queue
            .push(RunJob {
                run_id: id.clone(),
                pushed_at_us: 0,
            })
            .await
            .expect("push");
        if i % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let all = async {
        loop {
            if handler.seen.lock().expect("lock").len() >= ids.len() {
                return;
            }
            handler.done.notified().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("every job is handled");
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
