//! The byte-offset log API reads exactly as the SQLite Store's: the same log written to both,
//! then read from every offset with many sizes, including reads that cut a chunk inside a
//! multi-byte character.

use std::sync::Arc;
use std::time::Duration;

use skiff_core::run::{LogChunk, LogStream, NewRun, Phase, StepPlan, Trigger, TriggerKind};
use skiff_core::store::{SqliteStore, Store};
use skiff_redis::testing::RedisServer;
use skiff_redis::{RedisConfig, RedisStore};

fn new_run() -> NewRun {
    NewRun {
        pipeline: "logs".into(),
        trigger: Trigger {
            kind: TriggerKind::Cli,
            actor: "tester".into(),
        },
        params: Default::default(),
        source: "name: logs\n".into(),
        steps: (0..3)
            .map(|i| StepPlan {
                index: i,
                id: format!("s{i}"),
                name: format!("Step {i}"),
                phase: Phase::Main,
            })
            .collect(),
        rerun_of: None,
        idempotency_key: None,
        group: None,
        labels: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_match_the_sqlite_store_byte_for_byte() {
    let server = RedisServer::start();
    let redis: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&RedisConfig::new(server.url()))
            .await
            .expect("connect"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("skiff.db"))
            .await
            .expect("open"),
    );
    let at = chrono::Utc::now() - chrono::Duration::seconds(30);
    let batches: Vec<Vec<LogChunk>> = vec![
        vec![LogChunk {
            step: Some(0),
            stream: LogStream::Output,
            at,
            data: "héllo wörld — ✓ done\n".as_bytes().to_vec(),
        }],
        vec![
            LogChunk {
                step: None,
                stream: LogStream::Skiff,
                at: at + chrono::Duration::milliseconds(5),
                data: b"[skiff] step 1\n".to_vec(),
            },
            LogChunk {
                step: Some(1),
                stream: LogStream::Stderr,
                at: at + chrono::Duration::milliseconds(7),
                data: "🦀🦀🦀 crabs\n".repeat(9).into_bytes(),
            },
        ],
        vec![LogChunk {
            step: Some(2),
            stream: LogStream::Output,
            at: at + chrono::Duration::milliseconds(9),
            data: vec![b'x'; 300],
        }],
        vec![LogChunk {
            step: Some(2),
            stream: LogStream::Stdout,
            at: at + chrono::Duration::milliseconds(11),
            data: b"\x00\xff\xfe not utf-8 \xc3\n".to_vec(),
        }],
    ];
    let mut runs = Vec::new();
    for store in [&redis, &sqlite] {
        let run = store.create_run(new_run()).await.expect("create").run;
        let (_, claim) = store
            .claim_run(&run.id, "w", Duration::from_secs(30))
            .await
            .expect("claim");
        for batch in &batches {
            store.append_logs(&claim, batch).await.expect("append");
        }
        runs.push(run.id);
    }
    let len = redis
        .read_logs(&runs[0], 0, 1 << 20)
        .await
        .expect("read")
        .len;
    let mut compared = 0;
    for offset in 0..=len {
        for max in [1usize, 2, 3, 5, 7, 16, 40, 100, 333, 1 << 20] {
            let a = redis.read_logs(&runs[0], offset, max).await.expect("redis");
            let b = sqlite
                .read_logs(&runs[1], offset, max)
                .await
                .expect("sqlite");
            assert_eq!(a, b, "reading {max} bytes from {offset}");
            compared += 1;
        }
    }
    assert!(compared > 1000);
    let past = (
        redis.read_logs(&runs[0], len + 1, 10).await.map(|_| ()),
        sqlite.read_logs(&runs[1], len + 1, 10).await.map(|_| ()),
    );
    assert_eq!(
        format!("{:?}", past.0),
        format!("{:?}", past.1),
        "past the end"
    );
}
