//! skiff-server: the HTTP API, the web UI and live logs. It reads the Store and starts runs
//! through the `Dispatcher`; it never executes a step.

mod ansi;
pub mod api;
pub mod auth;
pub mod error;
mod openapi;
mod sse;
mod ui;

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use skiff_core::catalog::Catalog;
use skiff_core::dispatch::Dispatcher;
use skiff_core::store::{AuthStore, Store};

/// The largest request body accepted (a trigger with its params is a few KiB).
pub const MAX_BODY: usize = 256 << 10;

#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// SHA-256 of `SKIFF_ADMIN_TOKEN`, when one was given.
    pub admin_token_hash: Option<String>,
    /// Mark session cookies `Secure` (the server is reached over https).
    pub secure_cookies: bool,
}

/// The pipelines folder as last loaded; swapped whole when files change.
#[derive(Clone)]
pub struct CatalogHandle(Arc<RwLock<Arc<Catalog>>>);

impl CatalogHandle {
    pub fn new(catalog: Catalog) -> Self {
        CatalogHandle(Arc::new(RwLock::new(Arc::new(catalog))))
    }

    pub fn current(&self) -> Arc<Catalog> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, catalog: Catalog) {
        match self.0.write() {
            Ok(mut c) => *c = Arc::new(catalog),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(catalog),
        }
    }

    /// Reloads the folder every `every` when it changed; runs until the task is dropped.
    pub async fn watch(self, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let current = self.current();
            let dir = current.dir.clone();
            let stale = tokio::task::spawn_blocking(move || current.is_stale())
                .await
                .unwrap_or(false);
            if stale
                && let Ok(fresh) = tokio::task::spawn_blocking(move || Catalog::load(&dir)).await
            {
                let invalid = fresh.entries().filter(|e| !e.is_valid()).count();
                tracing::info!(pipelines = fresh.len(), invalid, "pipelines reloaded");
                self.replace(fresh);
            }
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub auth: Arc<dyn AuthStore>,
    pub catalog: CatalogHandle,
    pub dispatcher: Dispatcher,
    pub config: Arc<ServerConfig>,
    pub metrics: Option<PrometheusHandle>,
    /// Fired when the server stops: live streams end so that shutdown does not wait on them.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub login_throttle: Arc<auth::LoginThrottle>,
}

/// The whole HTTP surface.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(api::metrics))
        .route("/api/openapi.json", get(openapi::document))
        .route("/api/pipelines", get(api::list_pipelines))
        .route("/api/pipelines/{name}", get(api::get_pipeline))
        .route("/api/pipelines/{name}/runs", post(api::trigger))
        .route("/api/runs", get(api::list_runs))
        .route("/api/runs/{id}", get(api::get_run))
        .route("/api/runs/{id}/logs", get(api::read_logs))
        .route("/api/runs/{id}/logs/stream", get(sse::stream_logs))
        .route("/api/runs/{id}/cancel", post(api::cancel))
        .route("/api/runs/{id}/rerun", post(api::rerun))
        .route("/api/tokens", get(api::list_tokens).post(api::create_token))
        .route("/api/tokens/{id}/revoke", post(api::revoke_token))
        .route("/", get(ui::dashboard))
        .route("/login", get(ui::login_form).post(ui::login))
        .route("/login/link/{token}", get(ui::login_link))
        .route("/logout", post(ui::logout))
        .route("/pipelines/{name}", get(ui::pipeline))
        .route("/pipelines/{name}/run", post(ui::run_pipeline))
        .route("/runs/{id}", get(ui::run))
        .route("/runs/{id}/cancel", post(ui::cancel_run))
        .route("/runs/{id}/rerun", post(ui::rerun_run))
        .route("/settings", get(ui::settings))
        .route("/settings/password", post(ui::set_password))
        .route("/settings/tokens", post(ui::create_token))
        .route("/settings/tokens/{id}/revoke", post(ui::revoke_token))
        .route("/static/{*path}", get(ui::static_file))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}
