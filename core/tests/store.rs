//! The Store conformance suite against a real SQLite file.

use std::sync::Arc;

use skiff_core::store::{SqliteStore, Store, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("skiff.db"))
        .await
        .expect("open");
    conformance(Arc::new(store) as Arc<dyn Store>).await;
    // Reopening the same file finds the data and does not redo the schema.
    let again = SqliteStore::open(&dir.path().join("skiff.db"))
        .await
        .expect("reopen");
    let page = again.list_runs(&Default::default()).await.expect("list");
    assert!(!page.runs.is_empty());
}

/// API tokens made before tokens had scopes keep every power (`admin`), marked legacy; new ones
/// get the scope they are made with.
#[tokio::test]
async fn tokens_from_before_scopes_become_legacy_admin_tokens() {
    use skiff_core::store::{AuthStore, Scope};
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("skiff.db");
    {
        // The api_tokens table as schema version 6 had it, with one token.
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut c = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        for q in [
            "CREATE TABLE api_tokens (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL, last_used_at INTEGER, revoked_at INTEGER)",
            "INSERT INTO api_tokens (id, name, hash, created_at) VALUES ('t1', 'old', 'h1', 1)",
            "PRAGMA user_version = 6",
        ] {
            sqlx::query(q).execute(&mut c).await.expect(q);
        }
    }
    let store = SqliteStore::open(&path).await.expect("open and upgrade");
    store
        .create_token("new", "h2", Scope::Read)
        .await
        .expect("create");
    let tokens = store.list_tokens().await.expect("list");
    let got: Vec<(&str, Scope, bool)> = tokens
        .iter()
        .map(|t| (t.name.as_str(), t.scope, t.legacy))
        .collect();
    assert_eq!(
        got,
        [("new", Scope::Read, false), ("old", Scope::Admin, true)]
    );
    let found = store
        .find_token("h1")
        .await
        .expect("find")
        .expect("the old token");
    assert_eq!(found.scope, Scope::Admin);
}
