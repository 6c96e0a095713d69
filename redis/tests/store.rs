//! The Store on a real redis-server: the conformance suite every backend passes, and what only
//! a shared Store shows (two servers on one Redis, leases decided by Redis's clock).

use std::sync::Arc;
use std::time::Duration;

use skiff_core::run::{
    LogChunk, NewRun, Phase, RunStatus, StepPlan, StepStatus, Trigger, TriggerKind,
};
use skiff_core::store::{ChangeKind, Store, StoreError, TakeOver, conformance};
use skiff_redis::testing::RedisServer;
use skiff_redis::{RedisConfig, RedisStore};

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&RedisConfig::new(server.url()))
        .await
        .expect("connect")
}

fn new_run(pipeline: &str) -> NewRun {
    NewRun {
        pipeline: pipeline.into(),
        trigger: Trigger {
            kind: TriggerKind::Api,
            actor: "tester".into(),
        },
        params: Default::default(),
        source: "name: x\n".into(),
        steps: vec![StepPlan {
            index: 0,
            id: "s0".into(),
            name: "Step 0".into(),
            phase: Phase::Main,
        }],
        rerun_of: None,
        idempotency_key: None,
        group: None,
        labels: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    conformance(Arc::new(store) as Arc<dyn Store>).await;
}

/// Two servers on one Redis: a claim by one fences the other's writes, of concurrent claims
/// from both exactly one wins, and each hears of the other's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_share_one_redis() {
    let server = RedisServer::start();
    let a = connect(&server).await;
    let b = connect(&server).await;
    let mut a_feed = a.changes();
    let mut b_feed = b.changes();

    let run = a.create_run(new_run("shared")).await.expect("create").run;
    let seen = tokio::time::timeout(Duration::from_secs(5), b_feed.recv())
        .await
        .expect("b hears of a's run in time")
        .expect("a change");
    assert_eq!(
        (seen.run(), seen.kind),
        (Some(&run.id), ChangeKind::Status),
        "b hears of the run a created"
    );
    assert_eq!(
        b.get_run(&run.id).await.expect("get").expect("b reads it"),
        run
    );

    // Concurrent claims from both: exactly one wins.
    let tries: Vec<_> = (0..10)
        .map(|i| {
            let (store, id) = if i % 2 == 0 {
                (a.clone(), run.id.clone())
            } else {
                (b.clone(), run.id.clone())
            };
            tokio::spawn(async move {
                store
                    .claim_run(&id, &format!("w{i}"), Duration::from_secs(30))
                    .await
                    .map(|(_, claim)| (i, claim))
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in tries {
        match t.await.expect("task") {
            Ok(claim) => won.push(claim),
            Err(StoreError::InvalidTransition { .. }) => {}
            Err(e) => panic!("a losing claim is refused as a move: {e}"),
        }
    }
    assert_eq!(
        won.len(),
        1,
        "exactly one of ten claims from two stores wins"
    );
    let (winner, first) = won.remove(0);
    let (holder, other) = if winner % 2 == 0 { (&a, &b) } else { (&b, &a) };

    // The other store takes the run over: the first claim's writes are refused.
    let (_, second) = other
        .take_over_run(&run.id, "rescuer", Duration::from_secs(30), TakeOver::Any)
        .await
        .expect("take over");
    assert!(second.token > first.token);
    let stale = holder
        .append_logs(&first, &[LogChunk::output(Some(0), b"stale\n".to_vec())])
        .await;
    assert!(
        matches!(stale, Err(StoreError::StaleClaim { .. })),
        "a write under the old claim is refused: {stale:?}"
    );
    let len = other
        .append_logs(&second, &[LogChunk::output(Some(0), b"fresh\n".to_vec())])
        .await
        .expect("the new claim writes");
    assert_eq!(len, 6);
    let read = holder.read_logs(&run.id, 0, 1024).await.expect("read");
    assert_eq!(read.chunks[0].data, b"fresh\n", "both stores read one log");

    // Each hears of the other's changes (the log line, written by `other`, reaches `holder`).
    let holder_feed = if winner % 2 == 0 {
        &mut a_feed
    } else {
        &mut b_feed
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let change = tokio::time::timeout_at(deadline, holder_feed.recv())
            .await
            .expect("the other store's log change in time")
            .expect("a change");
        if change.run() == Some(&run.id) && change.kind == ChangeKind::Log {
            break;
        }
    }
    let ended = other
        .finish_run(&second, &[], RunStatus::Succeeded, None)
        .await
        .expect("finish");
    assert_eq!(ended.status, RunStatus::Succeeded);
    let got = holder.get_run(&run.id).await.expect("get").expect("run");
    assert_eq!(got.status, RunStatus::Succeeded);
}

/// Leases are decided by Redis's clock: a held run is not taken over until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_run_out_by_redis_time() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let run = store
        .create_run(new_run("lease"))
        .await
        .expect("create")
        .run;
    let (claimed, claim) = store
        .claim_run(&run.id, "w1", Duration::from_millis(300))
        .await
        .expect("claim");
    assert_eq!(
        claimed
            .started_at
            .map(|t| t + chrono::Duration::milliseconds(300)),
        Some(claim.expires_at),
        "the start and the lease are read from one clock, Redis's, at one moment"
    );
    let err = store
        .take_over_run(&run.id, "w2", Duration::from_secs(30), TakeOver::Expired)
        .await
        .expect_err("held");
    assert!(
        matches!(err, StoreError::Held { ref worker, .. } if worker == "w1"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (taken, second) = store
        .take_over_run(&run.id, "w2", Duration::from_secs(30), TakeOver::Expired)
        .await
        .expect("the lease ran out");
    assert!(second.token > claim.token);
    assert_eq!(taken.claimed_by.as_deref(), Some("w2"));
    assert!(
        matches!(
            store.renew_claim(&claim, Duration::from_secs(30)).await,
            Err(StoreError::StaleClaim { .. })
        ),
        "the old claim cannot be renewed"
    );
}

/// A log is cut at its cap: one line of skiff's says so, and later appends are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_cut_at_their_cap() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&RedisConfig {
        log_cap: 100,
        ..RedisConfig::new(server.url())
    })
    .await
    .expect("connect");
    let run = store.create_run(new_run("cap")).await.expect("create").run;
    let (_, claim) = store
        .claim_run(&run.id, "w", Duration::from_secs(30))
        .await
        .expect("claim");
    let len = store
        .append_logs(&claim, &[LogChunk::output(Some(0), vec![b'a'; 60])])
        .await
        .expect("append");
    assert_eq!(len, 60);
    let len = store
        .append_logs(
            &claim,
            &[
                LogChunk::output(Some(0), vec![b'b'; 30]),
                LogChunk::output(Some(0), vec![b'c'; 30]),
            ],
        )
        .await
        .expect("append past the cap");
    let after = store
        .append_logs(&claim, &[LogChunk::output(Some(0), vec![b'd'; 10])])
        .await
        .expect("append after the cut");
    assert_eq!(len, after, "appends past the cut are dropped");
    let read = store.read_logs(&run.id, 0, 1 << 20).await.expect("read");
    assert_eq!(read.chunks.len(), 3, "{:?}", read.chunks);
    assert_eq!(read.chunks[1].data, vec![b'b'; 30], "what fits is kept");
    let note = &read.chunks[2];
    assert_eq!(note.stream, skiff_core::run::LogStream::Skiff);
    assert!(
        String::from_utf8_lossy(&note.data).starts_with("[skiff] the log reached its limit"),
        "{:?}",
        String::from_utf8_lossy(&note.data)
    );
    assert_eq!(read.len, len);
    // Pruning the run deletes its log.
    store
        .finish_run(&claim, &[], RunStatus::Succeeded, None)
        .await
        .expect("finish");
    let deleted = store
        .prune_runs(&skiff_core::store::Prune {
            pipeline: "cap".into(),
            finished_before: None,
            keep_last: Some(0),
        })
        .await
        .expect("prune");
    assert!(
        deleted.is_empty(),
        "keeping none by count deletes none, as in SQLite"
    );
    let deleted = store
        .prune_runs(&skiff_core::store::Prune {
            pipeline: "cap".into(),
            finished_before: Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
            keep_last: None,
        })
        .await
        .expect("prune");
    assert_eq!(deleted, vec![run.id.clone()]);
    let steps = store.steps(&run.id).await.expect("steps");
    assert!(steps.is_empty());
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("skiff:d:run:{}:log", run.id))
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert_eq!(exists, 0, "the run's log stream is gone");
    let _ = StepStatus::Pending;
}

/// The change feed comes back by itself when Redis restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_survives_a_redis_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("redis.sock");
    let start = || {
        std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--unixsocket",
                socket.to_str().expect("utf-8"),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.path().to_str().expect("utf-8"),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server")
    };
    let wait = || {
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    };
    let mut first = start();
    wait();
    let url = format!("redis+unix://{}", socket.display());
    let a = RedisStore::connect(&RedisConfig::new(&url))
        .await
        .expect("a");
    let b = RedisStore::connect(&RedisConfig::new(&url))
        .await
        .expect("b");
    first.kill().expect("kill");
    first.wait().expect("wait");
    let _ = std::fs::remove_file(&socket);
    let mut second = start();
    wait();
    let mut feed = b.changes();
    // a's connection comes back by itself; b's subscription too, within a few tries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut heard = false;
    while tokio::time::Instant::now() < deadline && !heard {
        if let Ok(created) = a.create_run(new_run("restart")).await {
            let wait_for = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Ok(change)) = tokio::time::timeout_at(wait_for, feed.recv()).await {
                if change.run() == Some(&created.run.id) {
                    heard = true;
                    break;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    second.kill().expect("kill");
    let _ = second.wait();
    assert!(heard, "b hears of a's changes again after Redis restarted");
}

/// What Redis holds is never trusted: a record that does not parse is `Corrupt`, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_reported_not_panicked_on() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let run = store
        .create_run(new_run("corrupt"))
        .await
        .expect("create")
        .run;
    let client = redis::Client::open(server.url()).expect("client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let set = |key: String, field: &'static str, value: &'static [u8]| {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("HSET")
                .arg(key)
                .arg(field)
                .arg(value)
                .query_async(&mut conn)
                .await
                .expect("HSET");
        }
    };
    set(format!("skiff:d:run:{}:steps", run.id), "s:0", b"{not json").await;
    assert!(matches!(
        store.steps(&run.id).await,
        Err(StoreError::Corrupt(_))
    ));
    set(format!("skiff:d:run:{}", run.id), "status", b"sideways").await;
    assert!(matches!(
        store.get_run(&run.id).await,
        Err(StoreError::Corrupt(_))
    ));
    set(format!("skiff:d:run:{}", run.id), "status", b"queued").await;
    set(format!("skiff:d:run:{}", run.id), "v", b"2").await;
    let err = store.get_run(&run.id).await.expect_err("a newer schema");
    assert!(
        matches!(&err, StoreError::Corrupt(e) if e.contains("schema version 2")),
        "{err}"
    );
    let _: () = redis::cmd("SET")
        .arg(format!("skiff:d:run:{}:steps", run.id))
        .arg("a string, not a hash")
        .query_async(&mut conn.clone())
        .await
        .expect("SET");
    let err = store
        .steps(&run.id)
        .await
        .expect_err("a key of another type");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    set(format!("skiff:d:run:{}", run.id), "v", b"1").await;
    set(format!("skiff:d:run:{}", run.id), "params", b"\xff\xfe").await;
    assert!(matches!(
        store.list_runs(&Default::default()).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// A Redis that is gone is a `Backend` error that says so, in bounded time; and once it is
/// back, the same Store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_is_gone_is_a_backend_error() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let run = store.create_run(new_run("gone")).await.expect("create").run;
    nix_kill(server.pid(), "STOP");
    let started = std::time::Instant::now();
    let err = store.get_run(&run.id).await.expect_err("Redis is away");
    assert!(
        matches!(&err, StoreError::Backend(e) if e.starts_with("redis:")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the answer's timeout bounds the wait: {:?}",
        started.elapsed()
    );
    nix_kill(server.pid(), "CONT");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.get_run(&run.id).await {
            Ok(Some(got)) => {
                assert_eq!(got.id, run.id);
                break;
            }
            other if std::time::Instant::now() > deadline => {
                panic!("the Store works again once Redis is back: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn nix_kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}
