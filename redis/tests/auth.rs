//! `AuthStore` on a real redis-server, as the SQLite Store's is used by the server: the
//! password, scoped tokens (noted when used, refused once revoked), sessions that expire, and
//! login links that work once; and the key layout's promise: a worker's ACL user reaches runs
//! but never credentials.

use std::time::Duration;

use chrono::Utc;
use skiff_core::run::{LogChunk, NewRun, Phase, RunStatus, StepPlan, Trigger, TriggerKind};
use skiff_core::store::{AuthStore, Scope, Store, StoreError};
use skiff_redis::testing::RedisServer;
use skiff_redis::{RedisConfig, RedisStore};

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&RedisConfig::new(server.url()))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_tokens_sessions_and_links() {
    let server = RedisServer::start();
    let store = connect(&server).await;

    assert_eq!(store.password_hash().await.expect("hash"), None);
    store.set_password_hash("$argon2id$one").await.expect("set");
    store.set_password_hash("$argon2id$two").await.expect("set");
    assert_eq!(
        store.password_hash().await.expect("hash").as_deref(),
        Some("$argon2id$two"),
        "the password's hash is replaced"
    );

    let ci = store
        .create_token("ci", "hash-ci", Scope::Run)
        .await
        .expect("token");
    tokio::time::sleep(Duration::from_millis(2)).await;
    let reader = store
        .create_token("reader", "hash-reader", Scope::Read)
        .await
        .expect("token");
    assert!(!ci.legacy && ci.last_used_at.is_none() && ci.revoked_at.is_none());
    assert!(
        store
            .create_token("twin", "hash-ci", Scope::Admin)
            .await
            .is_err(),
        "a token hash is unique"
    );
    let listed = store.list_tokens().await.expect("list");
    assert_eq!(
        listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["reader", "ci"],
        "newest first"
    );
    assert_eq!(listed[1], ci, "a token reads back as made");
    let found = store
        .find_token("hash-ci")
        .await
        .expect("find")
        .expect("the token");
    assert_eq!(
        (found.id.as_str(), found.scope),
        (ci.id.as_str(), Scope::Run)
    );
    assert!(found.last_used_at.is_some(), "its use is noted");
    assert_eq!(store.find_token("no-such").await.expect("find"), None);
    assert!(store.revoke_token(&reader.id).await.expect("revoke"));
    assert!(
        !store.revoke_token(&reader.id).await.expect("revoke again"),
        "a revoked token is not revoked twice"
    );
    assert!(!store.revoke_token("no-such").await.expect("revoke"));
    assert_eq!(
        store.find_token("hash-reader").await.expect("find"),
        None,
        "a revoked token is refused"
    );
    let listed = store.list_tokens().await.expect("list");
    assert!(listed[0].revoked_at.is_some(), "revoked tokens stay listed");

    let later = Utc::now() + chrono::Duration::hours(1);
    store
        .create_session("s1", "csrf-1", later)
        .await
        .expect("session");
    store
        .create_session("s2", "csrf-2", later)
        .await
        .expect("session");
    store
        .create_session("s3", "csrf-3", later)
        .await
        .expect("session");
    store
        .create_session("gone", "csrf-x", Utc::now() - chrono::Duration::seconds(1))
        .await
        .expect("an expired session");
    let s1 = store
        .find_session("s1")
        .await
        .expect("find")
        .expect("session");
    assert_eq!(s1.csrf, "csrf-1");
    assert_eq!(s1.expires_at.timestamp_millis(), later.timestamp_millis());
    assert_eq!(
        store.find_session("gone").await.expect("find"),
        None,
        "an expired session is not found"
    );
    store
        .create_session(
            "brief",
            "csrf-b",
            Utc::now() + chrono::Duration::milliseconds(200),
        )
        .await
        .expect("session");
    assert!(store.find_session("brief").await.expect("find").is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.find_session("brief").await.expect("find"),
        None,
        "a session ends when it expires"
    );
    store.delete_session("s3").await.expect("sign out");
    assert_eq!(store.find_session("s3").await.expect("find"), None);
    store
        .delete_sessions_except("s1")
        .await
        .expect("everyone else out");
    assert!(store.find_session("s1").await.expect("find").is_some());
    assert_eq!(store.find_session("s2").await.expect("find"), None);

    store
        .create_login_link("link", Utc::now() + chrono::Duration::minutes(10))
        .await
        .expect("link");
    assert!(store.use_login_link("link").await.expect("use"));
    assert!(
        !store.use_login_link("link").await.expect("use again"),
        "a login link works once"
    );
    assert!(!store.use_login_link("no-such").await.expect("use"));
    store
        .create_login_link("old", Utc::now() - chrono::Duration::seconds(1))
        .await
        .expect("expired link");
    assert!(
        !store.use_login_link("old").await.expect("use"),
        "an expired link does not work"
    );
}

/// A worker's ACL user (`~skiff:d:*`, `&skiff:d:*`) runs a run from claim to end, records a
/// resource, and follows the change feed, but can read no credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_user_reaches_runs_but_not_credentials() {
    let server = RedisServer::start();
    let admin = connect(&server).await;
    admin
        .set_password_hash("$argon2id$secret")
        .await
        .expect("set");
    admin
        .create_session("session", "csrf", Utc::now() + chrono::Duration::hours(1))
        .await
        .expect("session");
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "worker",
            "on",
            ">worker-password",
            "resetkeys",
            "~skiff:d:*",
            "resetchannels",
            "&skiff:d:*",
            "+@all",
        ])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let worker = RedisStore::connect(&RedisConfig {
        username: Some("worker".into()),
        password: Some("worker-password".into()),
        ..RedisConfig::new(server.url())
    })
    .await
    .expect("the worker connects as its user");
    let wrong = RedisStore::connect(&RedisConfig {
        username: Some("worker".into()),
        password: Some("wrong".into()),
        ..RedisConfig::new(server.url())
    })
    .await;
    assert!(
        matches!(wrong, Err(StoreError::Backend(_))),
        "a wrong password is refused"
    );

    let run = admin
        .create_run(NewRun {
            pipeline: "acl".into(),
            trigger: Trigger {
                kind: TriggerKind::Api,
                actor: "tester".into(),
            },
            params: Default::default(),
            source: "name: acl\n".into(),
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
        })
        .await
        .expect("create")
        .run;
    let (_, claim) = worker
        .claim_run(&run.id, "w", Duration::from_secs(30))
        .await
        .expect("the worker claims");
    let claim = worker
        .renew_claim(&claim, Duration::from_secs(30))
        .await
        .expect("renews");
    let mut step = worker.steps(&run.id).await.expect("steps").remove(0);
    step.status = skiff_core::run::StepStatus::Succeeded;
    step.attempt = 1;
    worker
        .update_step(&claim, &step)
        .await
        .expect("writes a step");
    worker
        .append_logs(&claim, &[LogChunk::output(Some(0), b"hi\n".to_vec())])
        .await
        .expect("writes its log");
    worker
        .record_resource(
            Some(&claim),
            skiff_core::ledger::NewResource {
                id: format!("{}/c", run.id),
                kind: "container".into(),
                name: "c".into(),
                engine: None,
                service: Some("svc".into()),
                run: Some(run.id.clone()),
                step: Some(0),
                expires_at: None,
                hourly_price: Some(0.5),
            },
        )
        .await
        .expect("records a resource");
    let mut feed = admin.changes();
    let ended = worker
        .finish_run(&claim, &[], RunStatus::Succeeded, None)
        .await
        .expect("ends the run");
    assert_eq!(ended.status, RunStatus::Succeeded);
    // The server hears the worker's end (after the resource, which it may hear first).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let heard = tokio::time::timeout_at(deadline, feed.recv())
            .await
            .expect("the worker's change in time")
            .expect("a change");
        if heard.run() == Some(&run.id) && heard.kind == skiff_core::store::ChangeKind::Status {
            break;
        }
    }

    for (what, result) in [
        ("the password", worker.password_hash().await.map(|_| ())),
        (
            "a session",
            worker.find_session("session").await.map(|_| ()),
        ),
        ("the tokens", worker.list_tokens().await.map(|_| ())),
    ] {
        match result {
            Err(StoreError::Backend(e)) => {
                assert!(e.to_lowercase().contains("noperm"), "{what}: {e}")
            }
            other => panic!("the worker read {what}: {other:?}"),
        }
    }
    let deliveries = worker.deliveries(&Default::default()).await;
    assert!(
        matches!(&deliveries, Err(StoreError::Backend(e)) if e.to_lowercase().contains("noperm")),
        "the worker cannot read deliveries: {deliveries:?}"
    );
}
