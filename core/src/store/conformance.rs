//! The behaviour every Store backend must show, as one function any backend's tests call.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    ChangeKind, Claim, Delivery, DeliveryOutcome, DeliveryQuery, DeliveryResult, Redelivery,
    RunQuery, Store, StoreError, Subject, TakeOver,
};
use crate::ledger::{NewResource, ResourceQuery, ResourceState, ResourceUpdate};
use crate::run::Phase;
use crate::run::{LogChunk, NewRun, RunId, RunStatus, StepPlan, StepStatus, Trigger, TriggerKind};

fn new_run(pipeline: &str, steps: usize) -> NewRun {
    NewRun {
        pipeline: pipeline.to_string(),
        trigger: Trigger {
            kind: TriggerKind::Cli,
            actor: "tester".into(),
        },
        params: BTreeMap::from([("who".to_string(), "wörld $(rm -rf ~)".to_string())]),
        source: "name: x\nsteps:\n  - run: echo\n".into(),
        steps: (0..steps)
            .map(|i| StepPlan {
                index: i as u32,
                id: format!("s{i}"),
                name: format!("Step {i}"),
                phase: if i + 1 == steps {
                    Phase::Finally
                } else {
                    Phase::Main
                },
            })
            .collect(),
        rerun_of: None,
        idempotency_key: None,
        group: None,
        labels: Vec::new(),
    }
}

/// The lease the suite's claims take.
const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Claims a queued run as the suite's worker.
async fn claim(store: &Arc<dyn Store>, id: &RunId) -> Claim {
    store.claim_run(id, "tester", LEASE).await.expect("claim").1
}

/// `n` workers (`PREFIX0`...) claim the run at once; the claims that won.
async fn claim_race(store: &Arc<dyn Store>, id: &RunId, n: usize, prefix: &str) -> Vec<Claim> {
    let tries: Vec<_> = (0..n)
        .map(|i| {
            let (store, id, worker) = (store.clone(), id.clone(), format!("{prefix}{i}"));
            tokio::spawn(async move { store.claim_run(&id, &worker, LEASE).await })
        })
        .collect();
    let mut won = Vec::new();
    for t in tries {
        if let Ok((_, claim)) = t.await.expect("task") {
            won.push(claim);
        }
    }
    won
}

/// Runs the conformance suite against `store`, which must be empty, and panics with a message
/// naming the broken rule.
pub async fn conformance(store: Arc<dyn Store>) {
    numbering(&store).await;
    concurrent_numbering(store.clone()).await;
    round_trip(&store).await;
    transitions(&store).await;
    steps_and_outputs(&store).await;
    ending_with_steps(&store).await;
    logs(&store).await;
    listing(&store).await;
    missing(&store).await;
    cancelling(&store).await;
    releasing(store.clone()).await;
    groups(store.clone()).await;
    counting(&store).await;
    pruning(&store).await;
    reading_while_appending(store.clone()).await;
    claims(store.clone()).await;
    idempotent_create(store.clone()).await;
    ledger(&store).await;
    deliveries_and_schedules(store.clone()).await;
    change_feed(&store).await;
}

/// Reads that race appends see a consistent prefix of the log (the length they read and the
/// chunks up to it), never a chunk past it.
async fn reading_while_appending(store: Arc<dyn Store>) {
    let run = store
        .create_run(new_run("race", 1))
        .await
        .expect("create")
        .run;
    let claim = claim(&store, &run.id).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..300u32 {
                let line = format!("line {i}\n").into_bytes();
                store
                    .append_logs(&claim, &[LogChunk::output(Some(0), line)])
                    .await
                    .expect("append");
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let read = store.read_logs(&run.id, 0, 1 << 20).await.expect("read");
        let got: usize = read.chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(
            got as u64, read.next_offset,
            "a read is one piece of the log"
        );
        assert!(
            read.next_offset <= read.len,
            "a read never goes past the length it saw"
        );
        reads += 1;
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
}

/// Ends a new run of `pipeline` as succeeded, with a line of log.
async fn finished_run(store: &Arc<dyn Store>, pipeline: &str) -> crate::run::Run {
    let run = store
        .create_run(new_run(pipeline, 1))
        .await
        .expect("create")
        .run;
    let claim = claim(store, &run.id).await;
    store
        .append_logs(&claim, &[LogChunk::output(Some(0), b"line\n".to_vec())])
        .await
        .expect("log");
    store
        .finish_run(&claim, &[], RunStatus::Succeeded, None)
        .await
        .expect("end")
}

async fn pruning(store: &Arc<dyn Store>) {
    let mut ended = Vec::new();
    for _ in 0..5 {
        ended.push(finished_run(store, "prune").await);
    }
    let waiting = store
        .create_run(new_run("prune", 1))
        .await
        .expect("create")
        .run;
    let running = store
        .create_run(new_run("prune", 1))
        .await
        .expect("create")
        .run;
    claim(store, &running.id).await;
    let other = finished_run(store, "prune-other").await;
    assert!(
        store
            .pipelines_with_runs()
            .await
            .expect("pipelines")
            .iter()
            .any(|p| p == "prune"),
        "a pipeline with runs is listed"
    );

    // By count: the newest two finished runs stay; queued and running runs are never counted
    // or deleted.
    let deleted = store
        .prune_runs(&super::Prune {
            pipeline: "prune".into(),
            finished_before: None,
            keep_last: Some(2),
        })
        .await
        .expect("prune by count");
    let mut expected: Vec<RunId> = ended[..3].iter().map(|r| r.id.clone()).collect();
    let mut got = deleted.clone();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "pruning by count deletes the oldest finished runs"
    );
    for run in &ended[..3] {
        assert!(
            store.get_run(&run.id).await.expect("get").is_none(),
            "a pruned run is gone"
        );
        assert!(
            matches!(
                store.read_logs(&run.id, 0, 1024).await,
                Err(StoreError::NotFound(_))
            ),
            "a pruned run's log is gone"
        );
        assert!(
            store.steps(&run.id).await.expect("steps").is_empty(),
            "and its steps"
        );
    }
    for run in [&ended[3], &ended[4], &waiting, &running, &other] {
        assert!(
            store.get_run(&run.id).await.expect("get").is_some(),
            "run #{} of {} is kept",
            run.number,
            run.pipeline
        );
    }

    // By age: everything finished before now goes, the rest stays.
    let deleted = store
        .prune_runs(&super::Prune {
            pipeline: "prune".into(),
            finished_before: Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
            keep_last: None,
        })
        .await
        .expect("prune by age");
    assert_eq!(
        deleted.len(),
        2,
        "pruning by age deletes the runs that ended before"
    );
    let left = store
        .list_runs(&RunQuery {
            pipeline: Some("prune".into()),
            ..RunQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(left.runs.len(), 2, "the queued and the running run stay");

    // Numbers are never given twice, even once every run that had them is gone.
    let again = store
        .prune_runs(&super::Prune {
            pipeline: "prune-other".into(),
            finished_before: Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
            keep_last: Some(1),
        })
        .await
        .expect("prune");
    assert_eq!(again, vec![other.id.clone()]);
    let next = store
        .create_run(new_run("prune-other", 1))
        .await
        .expect("create")
        .run;
    assert_eq!(
        next.number,
        other.number + 1,
        "a deleted run's number is not reused"
    );
    let next = store
        .create_run(new_run("prune", 1))
        .await
        .expect("create")
        .run;
    assert_eq!(next.number, 8, "numbers continue past deleted runs");
}

async fn cancelling(store: &Arc<dyn Store>) {
    let mut changes = store.changes();
    let queued = store
        .create_run(new_run("cancel", 2))
        .await
        .expect("create")
        .run;
    let run = store
        .request_cancel(&queued.id, "cancelled by admin")
        .await
        .expect("cancel queued");
    assert_eq!(
        run.status,
        RunStatus::Cancelled,
        "a queued run is cancelled at once"
    );
    assert_eq!(run.reason.as_deref(), Some("cancelled by admin"));
    assert!(run.finished_at.is_some());
    let steps = store.steps(&run.id).await.expect("steps");
    assert!(
        steps.iter().all(|s| s.status == StepStatus::Skipped),
        "its steps never run: {steps:?}"
    );
    let changed = tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv()).await;
    assert!(matches!(changed, Ok(Ok(_))), "a change is announced");

    let running = store
        .create_run(new_run("cancel", 1))
        .await
        .expect("create")
        .run;
    let held = claim(store, &running.id).await;
    let run = store
        .request_cancel(&running.id, "cancelled by admin")
        .await
        .expect("cancel running");
    assert_eq!(
        (run.status, run.cancel_requested),
        (RunStatus::Running, true),
        "a running run is marked for its worker"
    );
    let got = store
        .get_run(&running.id)
        .await
        .expect("get")
        .expect("exists");
    assert!(got.cancel_requested);
    assert_eq!(
        (got.reason.as_deref(), got.cancel_reason.as_deref()),
        (None, Some("cancelled by admin")),
        "a request is recorded beside the run's reason, which only the run's end sets"
    );
    let twice = store
        .request_cancel(&running.id, "cancelled by someone else")
        .await
        .expect("cancel again");
    assert_eq!(
        twice.cancel_reason.as_deref(),
        Some("cancelled by admin"),
        "the first request is the one recorded"
    );
    let done = store
        .finish_run(
            &held,
            &[],
            RunStatus::Cancelled,
            got.cancel_reason.as_deref(),
        )
        .await
        .expect("worker cancels");
    assert_eq!(done.reason.as_deref(), Some("cancelled by admin"));

    // A cancel that comes too late to stop anything leaves the run's end as it is.
    let late = store
        .create_run(new_run("cancel", 1))
        .await
        .expect("create")
        .run;
    let late_claim = claim(store, &late.id).await;
    store
        .request_cancel(&late.id, "cancelled by admin")
        .await
        .expect("cancel");
    let ended = store
        .finish_run(&late_claim, &[], RunStatus::Succeeded, None)
        .await
        .expect("ends as it would have");
    assert_eq!(
        (
            ended.status,
            ended.reason.as_deref(),
            ended.cancel_requested
        ),
        (RunStatus::Succeeded, None, true),
        "status and reason agree; the request stays on record"
    );
    let again = store
        .request_cancel(&running.id, "too late")
        .await
        .expect("cancel ended");
    assert_eq!(
        (again.status, again.reason.as_deref()),
        (RunStatus::Cancelled, Some("cancelled by admin")),
        "an ended run is left as it is"
    );
    assert!(matches!(
        store.request_cancel(&RunId::generate(), "x").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn counting(store: &Arc<dyn Store>) {
    let counts = store.status_counts().await.expect("counts");
    let queued = counts
        .iter()
        .find(|(s, _)| *s == RunStatus::Queued)
        .map_or(0, |(_, n)| *n);
    let all = store
        .list_runs(&RunQuery {
            status: Some(RunStatus::Queued),
            limit: 500,
            ..RunQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(queued, all.runs.len() as u64, "counts agree with listing");
    assert!(counts.iter().all(|(_, n)| *n > 0));
}

async fn numbering(store: &Arc<dyn Store>) {
    let a1 = store
        .create_run(new_run("num-a", 1))
        .await
        .expect("create")
        .run;
    let a2 = store
        .create_run(new_run("num-a", 1))
        .await
        .expect("create")
        .run;
    let b1 = store
        .create_run(new_run("num-b", 1))
        .await
        .expect("create")
        .run;
    assert_eq!(
        (a1.number, a2.number, b1.number),
        (1, 2, 1),
        "runs are numbered per pipeline"
    );
    assert_ne!(a1.id, a2.id, "run ids are unique");
    assert_eq!(a1.status, RunStatus::Queued, "a new run is queued");
}

async fn concurrent_numbering(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create_run(new_run("num-c", 1))
                    .await
                    .expect("create")
                    .run
                    .number
            })
        })
        .collect();
    let mut numbers = Vec::new();
    for t in tasks {
        numbers.push(t.await.expect("task"));
    }
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=20).collect::<Vec<u64>>(),
        "concurrent creates get distinct, dense numbers"
    );
}

async fn round_trip(store: &Arc<dyn Store>) {
    let mut new = new_run("trip", 3);
    let original = store
        .create_run(new_run("trip", 1))
        .await
        .expect("create")
        .run;
    new.rerun_of = Some(original.id.clone());
    new.trigger = Trigger {
        kind: TriggerKind::Rerun,
        actor: "admin".into(),
    };
    let run = store.create_run(new.clone()).await.expect("create").run;
    let got = store.get_run(&run.id).await.expect("get").expect("exists");
    assert_eq!(got, run, "get_run returns what create_run returned");
    assert_eq!(got.params, new.params, "params survive unchanged");
    assert_eq!(
        got.source, new.source,
        "the pipeline snapshot survives unchanged"
    );
    assert_eq!(got.trigger, new.trigger, "the trigger is recorded");
    assert_eq!(got.rerun_of, Some(original.id), "rerun_of is recorded");
    let steps = store.steps(&run.id).await.expect("steps");
    assert_eq!(steps.len(), 3, "every planned step is stored");
    assert!(
        steps.iter().all(|s| s.status == StepStatus::Pending),
        "planned steps are pending"
    );
    assert_eq!(steps[2].phase, Phase::Finally, "the phase is stored");
    assert_eq!(
        steps.iter().map(|s| s.index).collect::<Vec<_>>(),
        vec![0, 1, 2],
        "steps come in order"
    );
}

async fn transitions(store: &Arc<dyn Store>) {
    let run = store
        .create_run(new_run("trans", 1))
        .await
        .expect("create")
        .run;
    let (running, held) = store
        .claim_run(&run.id, "tester", LEASE)
        .await
        .expect("queued -> running");
    assert_eq!(running.status, RunStatus::Running);
    assert!(running.started_at.is_some(), "running stamps started_at");
    assert!(running.finished_at.is_none());
    assert_eq!(
        running.claimed_by.as_deref(),
        Some("tester"),
        "the claim is recorded"
    );
    assert!(running.lease_until.is_some_and(|t| t > chrono::Utc::now()));
    let err = store
        .claim_run(&run.id, "other", LEASE)
        .await
        .expect_err("claimed twice");
    assert!(
        matches!(err, StoreError::InvalidTransition { .. }),
        "a running run cannot be claimed again: {err}"
    );
    let err = store
        .finish_run(&held, &[], RunStatus::Queued, None)
        .await
        .expect_err("running -> queued");
    assert!(
        matches!(err, StoreError::InvalidTransition { .. }),
        "a run ends only in an end state: {err}"
    );
    let failed = store
        .finish_run(&held, &[], RunStatus::Failed, Some("step 1 failed"))
        .await
        .expect("running -> failed");
    assert!(
        failed.finished_at.is_some(),
        "an end state stamps finished_at"
    );
    assert_eq!(
        failed.reason.as_deref(),
        Some("step 1 failed"),
        "the reason is stored"
    );
    let err = store
        .finish_run(&held, &[], RunStatus::Succeeded, None)
        .await
        .expect_err("failed -> succeeded");
    assert!(
        matches!(err, StoreError::StaleClaim { .. }),
        "end states are final, and an ended run's claim writes nothing: {err}"
    );
    let err = store
        .claim_run(&run.id, "tester", LEASE)
        .await
        .expect_err("failed -> running");
    assert!(
        matches!(err, StoreError::InvalidTransition { .. }),
        "end states are final: {err}"
    );

    let queued = store
        .create_run(new_run("trans", 1))
        .await
        .expect("create")
        .run;
    let cancelled = store
        .request_cancel(&queued.id, "by admin")
        .await
        .expect("cancel queued");
    assert_eq!(
        cancelled.status,
        RunStatus::Cancelled,
        "a queued run can be cancelled"
    );
    assert!(
        store.claim_run(&queued.id, "tester", LEASE).await.is_err(),
        "a run cancelled while queued is never claimed"
    );
}

/// Claims and their fencing tokens: of many claims at once one wins; a run taken over from its
/// worker refuses that worker's writes; leases are renewed and respected.
async fn claims(store: Arc<dyn Store>) {
    let run = store
        .create_run(new_run("claims", 2))
        .await
        .expect("create")
        .run;
    let mut won = claim_race(&store, &run.id, 10, "w").await;
    assert_eq!(won.len(), 1, "exactly one of ten concurrent claims wins");
    let first = won.remove(0);

    let renewed = store
        .renew_claim(&first, std::time::Duration::from_secs(60))
        .await
        .expect("renew");
    assert!(
        renewed.expires_at > first.expires_at,
        "a renewal moves the lease on"
    );
    let err = store
        .take_over_run(&run.id, "rescuer", LEASE, TakeOver::Expired)
        .await
        .expect_err("a live lease");
    assert!(
        matches!(err, StoreError::Held { .. }),
        "a run whose lease runs is not taken over: {err}"
    );

    // Its worker is presumed gone: the run is taken over, with a newer token.
    let short = store
        .renew_claim(&first, std::time::Duration::ZERO)
        .await
        .expect("renew to now");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (taken, second) = store
        .take_over_run(&run.id, "rescuer", LEASE, TakeOver::Expired)
        .await
        .expect("an expired lease is taken over");
    assert!(second.token > short.token, "a new claim has a newer token");
    assert_eq!(taken.claimed_by.as_deref(), Some("rescuer"));
    let mut step = store.steps(&run.id).await.expect("steps").remove(0);
    step.status = StepStatus::Running;
    for (what, result) in [
        (
            "update_step",
            store.update_step(&first, &step).await.map(|_| ()),
        ),
        (
            "append_logs",
            store
                .append_logs(&first, &[LogChunk::output(Some(0), b"stale\n".to_vec())])
                .await
                .map(|_| ()),
        ),
        (
            "renew_claim",
            store.renew_claim(&first, LEASE).await.map(|_| ()),
        ),
        (
            "finish_run",
            store
                .finish_run(&first, &[], RunStatus::Succeeded, None)
                .await
                .map(|_| ()),
        ),
    ] {
        assert!(
            matches!(result, Err(StoreError::StaleClaim { .. })),
            "{what} with a stale token is refused: {result:?}"
        );
    }
    assert_eq!(
        store.read_logs(&run.id, 0, 1024).await.expect("read").len,
        0,
        "the stale worker wrote nothing"
    );
    store
        .update_step(&second, &step)
        .await
        .expect("the new claim writes");
    let (_, third) = store
        .take_over_run(&run.id, "restarted", LEASE, TakeOver::Any)
        .await
        .expect("taken over whatever its lease");
    assert!(third.token > second.token);
    let ended = store
        .finish_run(&third, &[], RunStatus::Failed, Some("worker lost"))
        .await
        .expect("finish");
    assert_eq!(ended.status, RunStatus::Failed);
    assert!(
        matches!(
            store
                .take_over_run(&run.id, "late", LEASE, TakeOver::Any)
                .await,
            Err(StoreError::InvalidTransition { .. })
        ),
        "an ended run is not taken over"
    );
}

/// One run of a concurrency group at a time: a run made while another of its group is queued
/// or running is held (queued, no job, cannot be claimed); when the group's active run ends (or
/// is cancelled while queued), the oldest held run goes.
async fn groups(store: Arc<dyn Store>) {
    let make = |group: &str| {
        let mut new = new_run("grouped", 2);
        new.group = Some(group.to_string());
        new
    };
    let a = store.create_run(make("g")).await.expect("create").run;
    let b = store.create_run(make("g")).await.expect("create").run;
    let c = store.create_run(make("g")).await.expect("create").run;
    let other = store.create_run(make("h")).await.expect("create").run;
    assert_eq!(a.group.as_deref(), Some("g"));
    assert!(
        !a.held && b.held && c.held && !other.held,
        "{a:?} {b:?} {c:?} {other:?}"
    );
    assert!(
        matches!(
            store.claim_run(&b.id, "w", LEASE).await,
            Err(StoreError::InvalidTransition { .. })
        ),
        "a held run cannot be claimed"
    );
    let held = |id: &RunId| {
        let store = store.clone();
        let id = id.clone();
        async move { store.get_run(&id).await.expect("get").expect("run").held }
    };
    let first = claim(&store, &a.id).await;
    assert!(held(&b.id).await, "the group is held while its run runs");
    store
        .finish_run(&first, &[], RunStatus::Succeeded, None)
        .await
        .expect("finish");
    assert!(!held(&b.id).await, "the next run goes when the first ends");
    assert!(held(&c.id).await, "one at a time");
    store
        .request_cancel(&b.id, "not needed")
        .await
        .expect("cancel");
    assert!(
        !held(&c.id).await,
        "a run cancelled while queued lets the next go"
    );
    let third = claim(&store, &c.id).await;
    store
        .finish_run(&third, &[], RunStatus::Failed, Some("no"))
        .await
        .expect("finish");
    let d = store.create_run(make("g")).await.expect("create").run;
    assert!(
        !d.held,
        "a group with nothing active takes a new run at once"
    );
}

/// A claimed run whose steps have not started goes back to the queue with its claim dead, and
/// is claimed again (once); after a step started it cannot go back.
async fn releasing(store: Arc<dyn Store>) {
    let run = store
        .create_run(new_run("release", 2))
        .await
        .expect("create")
        .run;
    let first = claim(&store, &run.id).await;
    let back = store.release_run(&first).await.expect("released");
    assert_eq!(back.status, RunStatus::Queued, "{back:?}");
    assert!(back.started_at.is_none(), "not started: {back:?}");
    assert!(
        matches!(
            store.release_run(&first).await,
            Err(StoreError::StaleClaim { .. })
        ),
        "a released claim is dead"
    );
    assert!(
        matches!(
            store.renew_claim(&first, LEASE).await,
            Err(StoreError::StaleClaim { .. })
        ),
        "a released claim cannot be renewed"
    );
    let mut won = claim_race(&store, &run.id, 5, "again").await;
    assert_eq!(won.len(), 1, "a released run is claimed again exactly once");
    let second = won.remove(0);
    assert!(second.token > first.token);
    let mut step = store.steps(&run.id).await.expect("steps").remove(0);
    step.status = StepStatus::Running;
    store
        .update_step(&second, &step)
        .await
        .expect("a step starts");
    assert!(
        matches!(
            store.release_run(&second).await,
            Err(StoreError::InvalidTransition { .. })
        ),
        "a run whose step started does not go back"
    );
    assert_eq!(
        store
            .get_run(&run.id)
            .await
            .expect("get")
            .expect("run")
            .status,
        RunStatus::Running
    );
}

/// Creating a run with a key the pipeline has seen answers the first run and creates nothing.
async fn idempotent_create(store: Arc<dyn Store>) {
    let keyed = |key: &str| {
        let mut new = new_run("idem", 1);
        new.idempotency_key = Some(key.to_string());
        new
    };
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let (store, new) = (store.clone(), keyed("delivery-1"));
            tokio::spawn(async move { store.create_run(new).await.expect("create") })
        })
        .collect();
    let mut created = Vec::new();
    for t in tries {
        created.push(t.await.expect("task"));
    }
    assert_eq!(
        created.iter().filter(|c| c.created).count(),
        1,
        "one of eight concurrent creates with one key creates the run"
    );
    assert!(
        created.iter().all(|c| c.run.id == created[0].run.id),
        "the others answer the same run"
    );
    assert_eq!(
        created[0].run.idempotency_key.as_deref(),
        Some("delivery-1")
    );
    let other = store.create_run(keyed("delivery-2")).await.expect("create");
    assert!(other.created, "another key creates another run");
    let mut elsewhere = keyed("delivery-1");
    elsewhere.pipeline = "idem-other".into();
    assert!(
        store.create_run(elsewhere).await.expect("create").created,
        "keys are per pipeline"
    );
    let plain = store.create_run(new_run("idem", 1)).await.expect("create");
    let plain2 = store.create_run(new_run("idem", 1)).await.expect("create");
    assert!(
        plain.created && plain2.created,
        "runs without a key are all created"
    );
    let page = store
        .list_runs(&RunQuery {
            pipeline: Some("idem".into()),
            ..RunQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(page.runs.len(), 4, "no run was created twice");
}

async fn steps_and_outputs(store: &Arc<dyn Store>) {
    let run = store
        .create_run(new_run("steps", 2))
        .await
        .expect("create")
        .run;
    let mut step = store.steps(&run.id).await.expect("steps").remove(0);
    step.status = StepStatus::Failed;
    step.attempt = 3;
    step.exit_code = Some(7);
    step.started_at = Some(chrono::Utc::now());
    step.finished_at = step.started_at;
    step.reason = Some("exit code 7".into());
    step.outputs = BTreeMap::from([
        ("digest".into(), "sha256:abc".into()),
        ("multi".into(), "a\nb".into()),
    ]);
    let held = claim(store, &run.id).await;
    store.update_step(&held, &step).await.expect("update");
    let got = store.steps(&run.id).await.expect("steps");
    assert_eq!(got[0].status, StepStatus::Failed);
    assert_eq!(got[0].attempt, 3);
    assert_eq!(got[0].exit_code, Some(7));
    assert_eq!(got[0].outputs, step.outputs, "outputs survive unchanged");
    assert_eq!(got[0].reason, step.reason);
    assert_eq!(
        got[0].started_at.map(|t| t.timestamp_millis()),
        step.started_at.map(|t| t.timestamp_millis()),
        "times are kept to the millisecond"
    );
    assert_eq!(
        got[1].status,
        StepStatus::Pending,
        "other steps are untouched"
    );
}

/// `finish_run` writes the step records it is given with the run's end, all or nothing.
async fn ending_with_steps(store: &Arc<dyn Store>) {
    let run = store
        .create_run(new_run("ending", 3))
        .await
        .expect("create")
        .run;
    let held = claim(store, &run.id).await;
    let planned = store.steps(&run.id).await.expect("steps");
    let ended = |i: usize, status: StepStatus| {
        let mut step = planned[i].clone();
        step.status = status;
        step.attempt = 1;
        step.exit_code = (status == StepStatus::Failed).then_some(2);
        step.started_at = Some(chrono::Utc::now());
        step.finished_at = step.started_at;
        step.reason = (status == StepStatus::Failed).then(|| "failed with exit code 2".into());
        step.outputs = BTreeMap::from([("n".to_string(), format!("{i}\n\"q\""))]);
        step
    };
    let (first, last) = (
        ended(0, StepStatus::Failed),
        ended(2, StepStatus::Succeeded),
    );
    // A move the run cannot make writes none of the steps either.
    let err = store
        .finish_run(&held, std::slice::from_ref(&first), RunStatus::Queued, None)
        .await
        .expect_err("running -> queued");
    assert!(matches!(err, StoreError::InvalidTransition { .. }), "{err}");
    assert_eq!(
        store.steps(&run.id).await.expect("steps")[0].status,
        StepStatus::Pending,
        "a refused end writes no step"
    );
    let mut changes = store.changes();
    let run_now = store
        .finish_run(
            &held,
            &[first.clone(), last.clone()],
            RunStatus::Failed,
            Some("step 0 failed"),
        )
        .await
        .expect("the end with its steps");
    assert_eq!(run_now.status, RunStatus::Failed);
    assert_eq!(run_now.reason.as_deref(), Some("step 0 failed"));
    let got = store.steps(&run.id).await.expect("steps");
    for (want, got) in [(&first, &got[0]), (&last, &got[2])] {
        assert_eq!(
            got.status, want.status,
            "the step's state is written with the end"
        );
        assert_eq!(got.attempt, want.attempt);
        assert_eq!(got.exit_code, want.exit_code);
        assert_eq!(got.reason, want.reason);
        assert_eq!(got.outputs, want.outputs, "outputs survive unchanged");
        assert_eq!(
            got.finished_at.map(|t| t.timestamp_millis()),
            want.finished_at.map(|t| t.timestamp_millis())
        );
    }
    assert_eq!(
        got[1].status,
        StepStatus::Pending,
        "steps not given are untouched"
    );
    let mut kinds = Vec::new();
    while let Ok(change) = changes.try_recv() {
        if change.run() == Some(&run.id) {
            kinds.push(change.kind);
        }
    }
    assert_eq!(
        kinds,
        vec![ChangeKind::Step, ChangeKind::Step, ChangeKind::Status],
        "followers hear of the steps, then of the end"
    );
    // With a stale claim (the run has ended) nothing is written.
    let mut late = ended(1, StepStatus::Succeeded);
    late.reason = Some("late".into());
    let err = store
        .finish_run(&held, &[late], RunStatus::Succeeded, None)
        .await
        .expect_err("ended already");
    assert!(matches!(err, StoreError::StaleClaim { .. }), "{err}");
    assert_eq!(
        store.steps(&run.id).await.expect("steps")[1].status,
        StepStatus::Pending,
        "a stale claim writes no step"
    );
    assert_eq!(
        store
            .get_run(&run.id)
            .await
            .expect("get")
            .expect("run")
            .status,
        RunStatus::Failed
    );
}

async fn logs(store: &Arc<dyn Store>) {
    let run = store
        .create_run(new_run("logs", 1))
        .await
        .expect("create")
        .run;
    let empty = store.read_logs(&run.id, 0, 1024).await.expect("read empty");
    let held = claim(store, &run.id).await;
    assert!(
        empty.chunks.is_empty() && empty.len == 0,
        "a new run has an empty log"
    );
    let earlier = chrono::Utc::now() - chrono::Duration::seconds(90);
    let len = store
        .append_logs(
            &held,
            &[
                LogChunk {
                    at: earlier,
                    ..LogChunk::output(Some(0), b"hello\n".to_vec())
                },
                LogChunk::skiff(None, b"world\n".to_vec()),
            ],
        )
        .await
        .expect("append");
    assert_eq!(len, 12, "append returns the new length");
    let len = store
        .append_logs(&held, &[LogChunk::output(Some(0), vec![b'x'; 1000])])
        .await
        .expect("append");
    assert_eq!(len, 1012);
    let all = store.read_logs(&run.id, 0, 1 << 20).await.expect("read");
    let bytes: Vec<u8> = all.chunks.iter().flat_map(|c| c.data.clone()).collect();
    assert_eq!(
        &bytes[..12],
        b"hello\nworld\n",
        "reads return appended bytes in order"
    );
    assert_eq!(bytes.len(), 1012);
    assert_eq!((all.next_offset, all.len), (1012, 1012));
    assert_eq!(all.chunks[0].step, Some(0), "chunks keep their step");
    assert_eq!(all.chunks[1].step, None);
    assert_eq!(
        (all.chunks[0].stream, all.chunks[1].stream),
        (crate::run::LogStream::Output, crate::run::LogStream::Skiff),
        "and their stream"
    );
    assert_eq!(
        all.chunks[0].at.timestamp_millis(),
        earlier.timestamp_millis(),
        "and the time their lines were read, to the millisecond"
    );
    let mid = store
        .read_logs(&run.id, 8, 1 << 20)
        .await
        .expect("read from the middle of a chunk");
    assert_eq!(mid.chunks[0].offset, 8);
    assert_eq!(
        mid.chunks[0].data, b"rld\n",
        "a read can start inside a chunk"
    );
    let small = store.read_logs(&run.id, 0, 6).await.expect("small read");
    assert_eq!(small.chunks.len(), 1, "max_bytes limits a read");
    assert_eq!(small.next_offset, 6);
    let part = store
        .read_logs(&run.id, 12, 100)
        .await
        .expect("read part of a big chunk");
    assert_eq!(
        (
            part.chunks.len(),
            part.chunks[0].data.len(),
            part.next_offset
        ),
        (1, 100, 112),
        "a big chunk is read in parts"
    );
    let tail = store
        .read_logs(&run.id, 1012, 1024)
        .await
        .expect("read at the end");
    assert!(
        tail.chunks.is_empty() && tail.next_offset == 1012,
        "reading at the end gives nothing"
    );
    let err = store
        .read_logs(&run.id, 1013, 1024)
        .await
        .expect_err("past the end");
    assert!(
        matches!(err, StoreError::OffsetOutOfRange { len: 1012, .. }),
        "reading past the end is an error: {err}"
    );
    let got = store.get_run(&run.id).await.expect("get").expect("exists");
    assert_eq!(got.log_len, 1012, "the run knows its log length");
}

async fn listing(store: &Arc<dyn Store>) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            store
                .create_run(new_run("list", 1))
                .await
                .expect("create")
                .run
                .id,
        );
    }
    claim(store, &ids[1]).await;
    let page = store
        .list_runs(&RunQuery {
            pipeline: Some("list".into()),
            limit: 2,
            ..RunQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page.runs.iter().map(|r| r.number).collect::<Vec<_>>(),
        vec![5, 4],
        "newest first, limited"
    );
    let next = page.next.expect("a next page");
    let page2 = store
        .list_runs(&RunQuery {
            pipeline: Some("list".into()),
            limit: 2,
            cursor: Some(next),
            ..RunQuery::default()
        })
        .await
        .expect("list page 2");
    assert_eq!(
        page2.runs.iter().map(|r| r.number).collect::<Vec<_>>(),
        vec![3, 2],
        "the cursor continues"
    );
    let running = store
        .list_runs(&RunQuery {
            pipeline: Some("list".into()),
            status: Some(RunStatus::Running),
            ..RunQuery::default()
        })
        .await
        .expect("list running");
    assert_eq!(running.runs.len(), 1, "filter by status");
    assert_eq!(running.runs[0].id, ids[1]);
    assert!(running.next.is_none(), "no next page past the end");
    let all = store
        .list_runs(&RunQuery::default())
        .await
        .expect("list all");
    assert!(
        all.runs.iter().any(|r| r.pipeline != "list"),
        "no pipeline filter lists every pipeline"
    );
    let err = store
        .list_runs(&RunQuery {
            cursor: Some("not-a-cursor".into()),
            ..RunQuery::default()
        })
        .await
        .expect_err("bad cursor");
    assert!(
        matches!(err, StoreError::BadCursor(_)),
        "a bad cursor is an error: {err}"
    );
}

async fn missing(store: &Arc<dyn Store>) {
    let id = RunId::generate();
    assert!(
        store.get_run(&id).await.expect("get").is_none(),
        "an unknown run is None"
    );
    assert!(matches!(
        store.claim_run(&id, "tester", LEASE).await,
        Err(StoreError::NotFound(_))
    ));
    let ghost = Claim {
        run: id.clone(),
        worker: "tester".into(),
        token: 1,
        expires_at: chrono::Utc::now(),
    };
    assert!(matches!(
        store.read_logs(&id, 0, 10).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .append_logs(&ghost, &[LogChunk::output(None, b"x".to_vec())])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

/// The resources ledger: an intent before the thing, its life after, found by run and service;
/// a stale claim records nothing.
async fn ledger(store: &Arc<dyn Store>) {
    let run = store
        .create_run(new_run("ledger", 1))
        .await
        .expect("create")
        .run;
    let held = claim(store, &run.id).await;
    let new = NewResource {
        id: format!("{}/0/container", run.id),
        kind: "container".into(),
        name: "app-1-1".into(),
        engine: Some("engine-a".into()),
        service: Some("app".into()),
        run: Some(run.id.clone()),
        step: Some(0),
        expires_at: None,
        hourly_price: Some(0.0125),
    };
    let intent = store
        .record_resource(Some(&held), new.clone())
        .await
        .expect("intent");
    assert_eq!(
        (intent.state, intent.external_id.as_deref()),
        (ResourceState::Creating, None),
        "an intent is recorded before the thing exists"
    );
    let again = store
        .record_resource(Some(&held), new.clone())
        .await
        .expect("again");
    assert_eq!(
        again.created_at, intent.created_at,
        "recording an id twice answers the first"
    );
    let live = store
        .update_resource(
            Some(&held),
            &new.id,
            &ResourceUpdate {
                state: Some(ResourceState::Live),
                external_id: Some("c0ffee".into()),
                expires_at: None,
            },
        )
        .await
        .expect("live");
    assert_eq!(live.state, ResourceState::Live);
    assert_eq!(live.external_id.as_deref(), Some("c0ffee"));
    assert_eq!(live.hourly_price, Some(0.0125));
    let by_run = store
        .resources(&ResourceQuery {
            run: Some(run.id.clone()),
            ..ResourceQuery::default()
        })
        .await
        .expect("by run");
    assert_eq!(by_run, vec![live.clone()], "found by its run");
    let by_service = store
        .resources(&ResourceQuery {
            service: Some("app".into()),
            states: vec![ResourceState::Live, ResourceState::Creating],
            ..ResourceQuery::default()
        })
        .await
        .expect("by service");
    assert_eq!(by_service.len(), 1, "found by its service and state");
    let none = store
        .resources(&ResourceQuery {
            service: Some("app".into()),
            states: vec![ResourceState::Removed],
            ..ResourceQuery::default()
        })
        .await
        .expect("none");
    assert!(none.is_empty(), "state filters");
    // The run ends; its claim is stale, but the reaper (no claim) still updates the ledger.
    store
        .finish_run(&held, &[], RunStatus::Succeeded, None)
        .await
        .expect("finish");
    let stale = store
        .update_resource(
            Some(&held),
            &new.id,
            &ResourceUpdate {
                state: Some(ResourceState::Removed),
                ..ResourceUpdate::default()
            },
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::StaleClaim { .. })),
        "a stale claim changes nothing: {stale:?}"
    );
    let removed = store
        .update_resource(
            None,
            &new.id,
            &ResourceUpdate {
                state: Some(ResourceState::Removed),
                ..ResourceUpdate::default()
            },
        )
        .await
        .expect("removed");
    assert_eq!(
        removed.external_id.as_deref(),
        Some("c0ffee"),
        "unset fields are kept"
    );
    assert!(matches!(
        store
            .update_resource(None, "no-such", &ResourceUpdate::default())
            .await,
        Err(StoreError::ResourceNotFound(_))
    ));
}

/// Deliveries are recorded once per hook and id; a schedule slot fires once however many
/// servers try.
async fn deliveries_and_schedules(store: Arc<dyn Store>) {
    // Times are kept to the millisecond.
    let at = chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis())
        .expect("now");
    let delivery = |key: &str, hook: &str, age: chrono::Duration| Delivery {
        key: key.into(),
        hook: hook.into(),
        id: "d-1".into(),
        provider: "github".into(),
        event: "push".into(),
        received_at: at - age,
        verified: true,
        outcome: DeliveryOutcome::Skipped,
        reason: Some("branch `dev` is not one of: main".into()),
        results: vec![DeliveryResult {
            pipeline: "build".into(),
            outcome: DeliveryOutcome::Skipped,
            reason: Some("branch `dev` is not one of: main".into()),
            run: None,
        }],
        headers: vec![("x-github-event".into(), "push".into())],
        body: b"{\"ref\":\"refs/heads/dev\"}\0binary".to_vec(),
        body_len: 1 << 20,
        redelivery: None,
    };
    let first = delivery("k-1", "repo", chrono::Duration::days(8));
    store.record_delivery(&first).await.expect("record");
    store
        .record_delivery(&first)
        .await
        .expect("a key again changes nothing");
    // GitHub's Redeliver sends the same delivery id: each arrival is an entry of its own.
    let mut again = delivery("k-2", "repo", chrono::Duration::seconds(1));
    again.outcome = DeliveryOutcome::Started;
    again.results[0].outcome = DeliveryOutcome::Started;
    again.results[0].run = Some("run-1".into());
    again.redelivery = Some(Redelivery {
        of: "k-1".into(),
        by: "admin".into(),
        count: 1,
    });
    store.record_delivery(&again).await.expect("again");
    store
        .record_delivery(&delivery("k-3", "other", chrono::Duration::zero()))
        .await
        .expect("other hook");
    let listed = store
        .deliveries(&DeliveryQuery {
            hook: Some("repo".into()),
            ..DeliveryQuery::default()
        })
        .await
        .expect("list");
    let keys: Vec<&str> = listed.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys, ["k-2", "k-1"], "one hook's deliveries, newest first");
    assert_eq!(listed[1], first, "a delivery reads back as recorded");
    assert!(!listed[1].body_whole());
    assert_eq!(listed[0].runs().collect::<Vec<_>>(), ["run-1"]);
    assert_eq!(
        store.delivery("k-2").await.expect("one").as_ref(),
        Some(&listed[0])
    );
    assert_eq!(store.delivery("nope").await.expect("none"), None);
    let by_id = store
        .deliveries(&DeliveryQuery {
            id: Some("d-1".into()),
            limit: 2,
            ..DeliveryQuery::default()
        })
        .await
        .expect("by id");
    assert_eq!(by_id.len(), 2, "the limit holds");
    assert_eq!(
        store
            .prune_deliveries(at - chrono::Duration::days(7))
            .await
            .expect("prune"),
        1,
        "only what is older than the cut goes"
    );
    assert_eq!(store.delivery("k-1").await.expect("pruned"), None);
    // A burst of deliveries at once: each is logged, once, and each caller learns it is.
    let burst: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            let d = delivery(&format!("burst-{i}"), "burst", chrono::Duration::zero());
            tokio::spawn(async move { store.record_delivery(&d).await })
        })
        .collect();
    for task in burst {
        task.await.expect("task").expect("logged");
    }
    let logged = store
        .deliveries(&DeliveryQuery {
            hook: Some("burst".into()),
            limit: 500,
            ..DeliveryQuery::default()
        })
        .await
        .expect("burst");
    assert_eq!(logged.len(), 40, "every delivery of a burst is logged once");
    // A recorded delivery is in every read that starts after: read at once, each time (a
    // backend that commits later must not answer a read while another flush holds it).
    for i in 0..30 {
        let key = format!("read-back-{i}");
        store
            .record_delivery(&delivery(&key, "read-back", chrono::Duration::zero()))
            .await
            .expect("record");
        assert!(
            store.delivery(&key).await.expect("read").is_some(),
            "delivery {key} was recorded before this read"
        );
    }

    let key = "nightly/0";
    assert_eq!(store.schedule_mark(key).await.expect("mark"), None);
    let slot = chrono::Utc::now();
    let tries: Vec<_> = (0..6)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.advance_schedule(key, None, slot).await })
        })
        .collect();
    let mut fired = 0;
    for t in tries {
        if t.await.expect("task").expect("advance") {
            fired += 1;
        }
    }
    assert_eq!(fired, 1, "a slot fires once among many servers");
    let mark = store.schedule_mark(key).await.expect("mark").expect("set");
    assert_eq!(mark.timestamp_millis(), slot.timestamp_millis());
    let next = slot + chrono::Duration::hours(24);
    assert!(
        !store
            .advance_schedule(key, Some(next), next)
            .await
            .expect("wrong expectation"),
        "the mark moves only from what the caller saw"
    );
    assert!(
        store
            .advance_schedule(key, Some(mark), next)
            .await
            .expect("next")
    );
}

/// Every change comes through one feed, numbered in order.
async fn change_feed(store: &Arc<dyn Store>) {
    let mut feed = store.changes();
    let run = store
        .create_run(new_run("feed", 1))
        .await
        .expect("create")
        .run;
    let held = claim(store, &run.id).await;
    store
        .record_resource(
            Some(&held),
            NewResource {
                id: format!("{}/feed", run.id),
                kind: "image".into(),
                name: "feed:latest".into(),
                engine: None,
                service: None,
                run: Some(run.id.clone()),
                step: None,
                expires_at: None,
                hourly_price: None,
            },
        )
        .await
        .expect("resource");
    store
        .finish_run(&held, &[], RunStatus::Succeeded, None)
        .await
        .expect("finish");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let change = tokio::time::timeout(std::time::Duration::from_secs(5), feed.recv())
            .await
            .expect("a change in time")
            .expect("a change");
        seen.push(change);
    }
    assert!(
        seen.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "numbered one after another: {seen:?}"
    );
    let kinds: Vec<(bool, ChangeKind)> = seen
        .iter()
        .map(|c| (matches!(c.subject, Subject::Run(_)), c.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            (true, ChangeKind::Status),
            (true, ChangeKind::Status),
            (false, ChangeKind::Resource),
            (true, ChangeKind::Status)
        ],
        "created, claimed, a resource, finished: {seen:?}"
    );
}
