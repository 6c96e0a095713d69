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
