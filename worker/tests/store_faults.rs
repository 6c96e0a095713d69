//! The runner when the Store fails under it: a Store that fails on demand wraps a real SQLite
//! Store (the point is the runner's behaviour, not the Store's).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use skiff_core::ledger::{NewResource, Resource, ResourceQuery, ResourceUpdate};
use skiff_core::run::{
    LogChunk, NewRun, Run, RunId, RunStatus, StepRecord, StepStatus, Trigger, TriggerKind,
};
use skiff_core::store::{
    Change, Claim, Created, Delivery, DeliveryQuery, LogRead, Prune, Result, RunPage, RunQuery,
    SqliteStore, Store, StoreError, TakeOver,
};
use skiff_worker::secrets::Secrets;
use skiff_worker::{RunObserver, RunOptions, execute_run};
use tokio_util::sync::CancellationToken;

/// A Store that answers every call with an error while `down` is set, and takes `slow`'s time
/// over the writes it names.
struct Flaky {
    inner: SqliteStore,
    down: Arc<AtomicBool>,
    slow: Arc<Slow>,
}

/// Milliseconds a write waits before it reaches the Store.
#[derive(Default)]
struct Slow {
    running_steps: AtomicU64,
    ends: AtomicU64,
}

async fn wait_out(ms: &AtomicU64) {
    let ms = ms.load(Ordering::SeqCst);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

impl Flaky {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Backend("the store is down (injected)".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for Flaky {
    async fn create_run(&self, new: NewRun) -> Result<Created> {
        self.check()?;
        self.inner.create_run(new).await
    }
    async fn get_run(&self, id: &RunId) -> Result<Option<Run>> {
        self.check()?;
        self.inner.get_run(id).await
    }
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage> {
        self.check()?;
        self.inner.list_runs(query).await
    }
    async fn steps(&self, id: &RunId) -> Result<Vec<StepRecord>> {
        self.check()?;
        self.inner.steps(id).await
    }
    async fn claim_run(&self, id: &RunId, worker: &str, lease: Duration) -> Result<(Run, Claim)> {
        self.check()?;
        self.inner.claim_run(id, worker, lease).await
    }
    async fn take_over_run(
        &self,
        id: &RunId,
        worker: &str,
        lease: Duration,
        when: TakeOver,
    ) -> Result<(Run, Claim)> {
        self.check()?;
        self.inner.take_over_run(id, worker, lease, when).await
    }
    async fn release_run(&self, claim: &Claim) -> Result<Run> {
        self.check()?;
        self.inner.release_run(claim).await
    }
    async fn renew_claim(&self, claim: &Claim, lease: Duration) -> Result<Claim> {
        self.check()?;
        self.inner.renew_claim(claim, lease).await
    }
    async fn update_step(&self, claim: &Claim, step: &StepRecord) -> Result<()> {
        if step.status == StepStatus::Running {
            wait_out(&self.slow.running_steps).await;
        }
        self.check()?;
        self.inner.update_step(claim, step).await
    }
    async fn append_logs(&self, claim: &Claim, chunks: &[LogChunk]) -> Result<u64> {
        self.check()?;
        self.inner.append_logs(claim, chunks).await
    }
    async fn finish_run(
        &self,
        claim: &Claim,
        steps: &[StepRecord],
        status: RunStatus,
        reason: Option<&str>,
    ) -> Result<Run> {
        wait_out(&self.slow.ends).await;
        self.check()?;
        self.inner.finish_run(claim, steps, status, reason).await
    }
    async fn read_logs(&self, id: &RunId, offset: u64, max: usize) -> Result<LogRead> {
        self.check()?;
        self.inner.read_logs(id, offset, max).await
    }
    async fn request_cancel(&self, id: &RunId, reason: &str) -> Result<Run> {
        self.check()?;
        self.inner.request_cancel(id, reason).await
    }
    async fn prune_runs(&self, prune: &Prune) -> Result<Vec<RunId>> {
        self.check()?;
        self.inner.prune_runs(prune).await
    }
    async fn pipelines_with_runs(&self) -> Result<Vec<String>> {
        self.check()?;
        self.inner.pipelines_with_runs().await
    }
    async fn record_resource(&self, claim: Option<&Claim>, new: NewResource) -> Result<Resource> {
        self.check()?;
        self.inner.record_resource(claim, new).await
    }
    async fn update_resource(
        &self,
        claim: Option<&Claim>,
        id: &str,
        update: &ResourceUpdate,
    ) -> Result<Resource> {
        self.check()?;
        self.inner.update_resource(claim, id, update).await
    }
    async fn resources(&self, query: &ResourceQuery) -> Result<Vec<Resource>> {
        self.check()?;
        self.inner.resources(query).await
    }
    async fn record_delivery(&self, delivery: &Delivery) -> Result<()> {
        self.check()?;
        self.inner.record_delivery(delivery).await
    }
    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>> {
        self.check()?;
        self.inner.deliveries(query).await
    }
    async fn delivery(&self, key: &str) -> Result<Option<Delivery>> {
        self.check()?;
        self.inner.delivery(key).await
    }
    async fn prune_deliveries(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        self.check()?;
        self.inner.prune_deliveries(before).await
    }
    async fn schedule_mark(&self, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.check()?;
        self.inner.schedule_mark(key).await
    }
    async fn advance_schedule(
        &self,
        key: &str,
        expected: Option<chrono::DateTime<chrono::Utc>>,
        slot: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        self.check()?;
        self.inner.advance_schedule(key, expected, slot).await
    }
    async fn status_counts(&self) -> Result<Vec<(RunStatus, u64)>> {
        self.check()?;
        self.inner.status_counts().await
    }
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.changes()
    }
}

struct Quiet;

impl RunObserver for Quiet {
    fn log(&self, _step: Option<u32>, _data: &[u8]) {}
}

struct Setup {
    dir: tempfile::TempDir,
    sqlite: SqliteStore,
    flaky: Arc<Flaky>,
    down: Arc<AtomicBool>,
    slow: Arc<Slow>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = SqliteStore::open(&dir.path().join("skiff.db"))
        .await
        .expect("open");
    let down = Arc::new(AtomicBool::new(false));
    let slow = Arc::new(Slow::default());
    let flaky = Arc::new(Flaky {
        inner: sqlite.clone(),
        down: down.clone(),
        slow: slow.clone(),
    });
    Setup {
        dir,
        sqlite,
        flaky,
        down,
        slow,
    }
}

impl Setup {
    /// Creates and claims a run of `yaml`.
    async fn start(&self, yaml: &str) -> (Run, Claim, skiff_core::pipeline::Pipeline) {
        let pipeline = skiff_core::pipeline::load(yaml, "faults").expect("valid pipeline");
        let run = self
            .sqlite
            .create_run(NewRun {
                pipeline: pipeline.name.clone(),
                trigger: Trigger {
                    kind: TriggerKind::Cli,
                    actor: "test".into(),
                },
                params: Default::default(),
                source: yaml.to_string(),
                steps: pipeline.plan(),
                rerun_of: None,
                idempotency_key: None,
                group: None,
                labels: Vec::new(),
            })
            .await
            .expect("create")
            .run;
        let (run, claim) = self
            .sqlite
            .claim_run(&run.id, "test-worker", Duration::from_secs(30))
            .await
            .expect("claim");
        (run, claim, pipeline)
    }

    fn options(&self, patience: Duration) -> RunOptions {
        RunOptions {
            workspace_root: self.dir.path().join("workspaces"),
            // These tests are about the Store, not about who the steps run as.
            isolation: skiff_worker::isolation::Isolation::Off("a Store test".into()),
            allow_docker_steps: false,
            keep_workspace: false,
            spares: Default::default(),
            tools: Default::default(),
            kill_grace: Duration::from_secs(2),
            secrets: Secrets::default(),
            cancel: CancellationToken::new(),
            abort: CancellationToken::new(),
            cancel_reason: "cancelled".into(),
            abort_reason: "aborted".into(),
            lease: Duration::from_secs(30),
            store_patience: patience,
            end_behind: None,
        }
    }

    /// Sets the Store down after `after`, and up again `for_` later.
    fn outage(&self, after: Duration, for_: Duration) {
        let down = self.down.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            down.store(true, Ordering::SeqCst);
            tokio::time::sleep(for_).await;
            down.store(false, Ordering::SeqCst);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_outage_is_retried_and_the_run_goes_on() {
    let s = setup().await;
    let (run, claim, pipeline) = s
        .start("steps:\n  - run: echo one\n  - run: sleep 0.3; echo two\n  - run: echo three\n")
        .await;
    s.outage(Duration::from_millis(100), Duration::from_millis(600));
    let outcome = execute_run(
        s.flaky.clone(),
        &run,
        claim,
        &pipeline,
        &s.options(Duration::from_secs(30)),
        Arc::new(Quiet),
    )
    .await
    .expect("run");
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    let stored = s.sqlite.get_run(&run.id).await.expect("get").expect("run");
    assert_eq!(stored.status, RunStatus::Succeeded);
    let steps = s.sqlite.steps(&run.id).await.expect("steps");
    assert!(
        steps.iter().all(|st| st.status == StepStatus::Succeeded),
        "every step's record was written after the retries: {steps:?}"
    );
    let log = s.sqlite.read_logs(&run.id, 0, 1 << 20).await.expect("log");
    let text: String = log
        .chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert!(
        text.contains("one") && text.contains("two") && text.contains("three"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_stops_the_main_steps_runs_finally_and_records_it_when_the_store_is_back() {
    let s = setup().await;
    let marker = s.dir.path().join("cleaned");
    let yaml = format!(
        "steps:\n  - run: sleep 0.3; echo main\n  - run: echo never\nfinally:\n  - run: echo cleaned > {}\n",
        marker.display()
    );
    let (run, claim, pipeline) = s.start(&yaml).await;
    // Down from before the first step ends until well after the run gave up on it.
    s.outage(Duration::from_millis(100), Duration::from_millis(1500));
    let outcome = execute_run(
        s.flaky.clone(),
        &run,
        claim,
        &pipeline,
        &s.options(Duration::from_millis(200)),
        Arc::new(Quiet),
    )
    .await
    .expect("run");
    assert_eq!(outcome.status, RunStatus::Failed, "{outcome:?}");
    assert!(marker.exists(), "finally ran although the store was away");
    let stored = s.sqlite.get_run(&run.id).await.expect("get").expect("run");
    assert_eq!(stored.status, RunStatus::Failed, "{stored:?}");
    assert!(
        stored
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("store unavailable")),
        "{stored:?}"
    );
    let steps = s.sqlite.steps(&run.id).await.expect("steps");
    let statuses: Vec<StepStatus> = steps.iter().map(|st| st.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Skipped,
            StepStatus::Succeeded
        ],
        "the records held back were written once the store was back: {steps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_taken_over_stops_and_its_old_worker_writes_nothing_more() {
    let s = setup().await;
    let (run, claim, pipeline) = s
        .start("steps:\n  - run: echo started; sleep 30\nfinally:\n  - run: echo finally\n")
        .await;
    let store = s.sqlite.clone();
    let id = run.id.clone();
    let taker = tokio::spawn(async move {
        // Once the step runs, another worker takes the run over.
        loop {
            let steps = store.steps(&id).await.expect("steps");
            if steps[0].status == StepStatus::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        store
            .take_over_run(&id, "rescuer", Duration::from_secs(30), TakeOver::Any)
            .await
            .expect("take over")
    });
    let mut opts = s.options(Duration::from_secs(30));
    // Renewals notice the lost claim quickly.
    opts.lease = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let outcome = execute_run(
        s.flaky.clone(),
        &run,
        claim,
        &pipeline,
        &opts,
        Arc::new(Quiet),
    )
    .await
    .expect("run");
    let (_, new_claim) = taker.await.expect("taker");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the step was stopped rather than waited for"
    );
    assert_eq!(outcome.status, RunStatus::Failed, "{outcome:?}");
    let stored = s.sqlite.get_run(&run.id).await.expect("get").expect("run");
    assert_eq!(
        (stored.status, stored.claimed_by.as_deref()),
        (RunStatus::Running, Some("rescuer")),
        "the run is the new worker's: the old one ended nothing"
    );
    let steps = s.sqlite.steps(&run.id).await.expect("steps");
    assert_eq!(
        steps[1].status,
        StepStatus::Pending,
        "the old worker ran no finally step and wrote nothing more"
    );
    s.sqlite
        .finish_run(&new_claim, &[], RunStatus::Failed, Some("worker lost"))
        .await
        .expect("the new worker ends it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_record_the_steps_end_overtakes_is_not_waited_for() {
    let s = setup().await;
    let (run, claim, pipeline) = s
        .start("steps:\n  - run: echo one\n  - run: echo two\n")
        .await;
    // The "running" writes wait behind (say) other runs' writes for longer than the steps take.
    s.slow.running_steps.store(60_000, Ordering::SeqCst);
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        execute_run(
            s.flaky.clone(),
            &run,
            claim,
            &pipeline,
            &s.options(Duration::from_secs(30)),
            Arc::new(Quiet),
        ),
    )
    .await
    .expect("the run ended without waiting for its steps' superseded running records")
    .expect("run");
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    let steps = s.sqlite.steps(&run.id).await.expect("steps");
    assert!(
        steps
            .iter()
            .all(|st| st.status == StepStatus::Succeeded && st.started_at.is_some()),
        "each step's end was written, with its start: {steps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frees_its_slot_before_the_runs_end_is_written_and_waits_for_it_when_stopping() {
    let s = setup().await;
    let (run, claim, pipeline) = s.start("steps:\n  - run: echo one\n").await;
    s.slow.ends.store(1_500, Ordering::SeqCst);
    let ends = tokio_util::task::TaskTracker::new();
    let opts = RunOptions {
        end_behind: Some(ends.clone()),
        ..s.options(Duration::from_secs(30))
    };
    let started = std::time::Instant::now();
    let outcome = execute_run(
        s.flaky.clone(),
        &run,
        claim,
        &pipeline,
        &opts,
        Arc::new(Quiet),
    )
    .await
    .expect("run");
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1_200),
        "the slot was freed before the end's write: {:?}",
        started.elapsed()
    );
    let stored = s.sqlite.get_run(&run.id).await.expect("get").expect("run");
    assert_eq!(
        stored.status,
        RunStatus::Running,
        "the end is still being written, under the run's claim"
    );
    ends.close();
    tokio::time::timeout(Duration::from_secs(20), ends.wait())
        .await
        .expect("the end's write ended");
    let stored = s.sqlite.get_run(&run.id).await.expect("get").expect("run");
    assert_eq!(stored.status, RunStatus::Succeeded);
    let steps = s.sqlite.steps(&run.id).await.expect("steps");
    assert_eq!(steps[0].status, StepStatus::Succeeded, "{steps:?}");
}
