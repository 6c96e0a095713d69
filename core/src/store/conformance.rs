//! The behaviour every Store backend must show, as one function any backend's tests call.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{RunQuery, Store, StoreError};
use crate::pipeline::Phase;
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
    }
}

/// Runs the conformance suite against `store`, which must be empty, and panics with a message
/// naming the broken rule.
pub async fn conformance(store: Arc<dyn Store>) {
    numbering(&store).await;
    concurrent_numbering(store.clone()).await;
    round_trip(&store).await;
    transitions(&store).await;
    steps_and_outputs(&store).await;
    logs(&store).await;
    listing(&store).await;
    missing(&store).await;
    cancelling(&store).await;
    counting(&store).await;
    pruning(&store).await;
    reading_while_appending(store.clone()).await;
}

/// Reads that race appends see a consistent prefix of the log (the length they read and the
/// chunks up to it), never a chunk past it.
async fn reading_while_appending(store: Arc<dyn Store>) {
    let run = store.create_run(new_run("race", 1)).await.expect("create");
    let writer = {
        let (store, id) = (store.clone(), run.id.clone());
        tokio::spawn(async move {
            for i in 0..300u32 {
                let line = format!("line {i}\n").into_bytes();
                store
                    .append_logs(
                        &id,
                        &[LogChunk {
                            step: Some(0),
                            data: line,
                        }],
                    )
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
        .expect("create");
    store
        .set_status(&run.id, RunStatus::Running, None)
        .await
        .expect("claim");
    store
        .append_logs(
            &run.id,
            &[LogChunk {
                step: Some(0),
                data: b"line\n".to_vec(),
            }],
        )
        .await
        .expect("log");
    store
        .set_status(&run.id, RunStatus::Succeeded, None)
        .await
        .expect("end")
}

async fn pruning(store: &Arc<dyn Store>) {
    let mut ended = Vec::new();
    for _ in 0..5 {
        ended.push(finished_run(store, "prune").await);
    }
    let waiting = store.create_run(new_run("prune", 1)).await.expect("create");
    let running = store.create_run(new_run("prune", 1)).await.expect("create");
    store
        .set_status(&running.id, RunStatus::Running, None)
        .await
        .expect("claim");
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
        .expect("create");
    assert_eq!(
        next.number,
        other.number + 1,
        "a deleted run's number is not reused"
    );
    let next = store.create_run(new_run("prune", 1)).await.expect("create");
    assert_eq!(next.number, 8, "numbers continue past deleted runs");
}

async fn cancelling(store: &Arc<dyn Store>) {
    let mut changes = store.changes();
    let queued = store
        .create_run(new_run("cancel", 2))
        .await
        .expect("create");
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
        .expect("create");
    store
        .set_status(&running.id, RunStatus::Running, None)
        .await
        .expect("run");
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
        .set_status(
            &running.id,
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
        .expect("create");
    store
        .set_status(&late.id, RunStatus::Running, None)
        .await
        .expect("run");
    store
        .request_cancel(&late.id, "cancelled by admin")
        .await
        .expect("cancel");
    let ended = store
        .set_status(&late.id, RunStatus::Succeeded, None)
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
    let a1 = store.create_run(new_run("num-a", 1)).await.expect("create");
    let a2 = store.create_run(new_run("num-a", 1)).await.expect("create");
    let b1 = store.create_run(new_run("num-b", 1)).await.expect("create");
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
    let original = store.create_run(new_run("trip", 1)).await.expect("create");
    new.rerun_of = Some(original.id.clone());
    new.trigger = Trigger {
        kind: TriggerKind::Rerun,
        actor: "admin".into(),
    };
    let run = store.create_run(new.clone()).await.expect("create");
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
    let run = store.create_run(new_run("trans", 1)).await.expect("create");
    let err = store
        .set_status(&run.id, RunStatus::Succeeded, None)
        .await
        .expect_err("queued -> succeeded");
    assert!(
        matches!(err, StoreError::InvalidTransition { .. }),
        "queued cannot jump to succeeded: {err}"
    );
    let running = store
        .set_status(&run.id, RunStatus::Running, None)
        .await
        .expect("queued -> running");
    assert!(running.started_at.is_some(), "running stamps started_at");
    assert!(running.finished_at.is_none());
    let failed = store
        .set_status(&run.id, RunStatus::Failed, Some("step 1 failed"))
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
        .set_status(&run.id, RunStatus::Running, None)
        .await
        .expect_err("failed -> running");
    assert!(
        matches!(err, StoreError::InvalidTransition { .. }),
        "end states are final: {err}"
    );

    let queued = store.create_run(new_run("trans", 1)).await.expect("create");
    let cancelled = store
        .set_status(&queued.id, RunStatus::Cancelled, Some("by admin"))
        .await
        .expect("cancel queued");
    assert_eq!(
        cancelled.status,
        RunStatus::Cancelled,
        "a queued run can be cancelled"
    );
}

async fn steps_and_outputs(store: &Arc<dyn Store>) {
    let run = store.create_run(new_run("steps", 2)).await.expect("create");
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
    store.update_step(&run.id, &step).await.expect("update");
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

async fn logs(store: &Arc<dyn Store>) {
    let run = store.create_run(new_run("logs", 1)).await.expect("create");
    let empty = store.read_logs(&run.id, 0, 1024).await.expect("read empty");
    assert!(
        empty.chunks.is_empty() && empty.len == 0,
        "a new run has an empty log"
    );
    let len = store
        .append_logs(
            &run.id,
            &[
                LogChunk {
                    step: Some(0),
                    data: b"hello\n".to_vec(),
                },
                LogChunk {
                    step: None,
                    data: b"world\n".to_vec(),
                },
            ],
        )
        .await
        .expect("append");
    assert_eq!(len, 12, "append returns the new length");
    let len = store
        .append_logs(
            &run.id,
            &[LogChunk {
                step: Some(0),
                data: vec![b'x'; 1000],
            }],
        )
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
                .id,
        );
    }
    store
        .set_status(&ids[1], RunStatus::Running, None)
        .await
        .expect("run");
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
        store.set_status(&id, RunStatus::Running, None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.read_logs(&id, 0, 10).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .append_logs(
                &id,
                &[LogChunk {
                    step: None,
                    data: b"x".to_vec()
                }]
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
}
