//! skiff-server: the HTTP API, the web UI and live logs. It reads the Store and starts runs
//! through the `Dispatcher`; it never executes a step.

mod ansi;
pub mod api;
pub mod auth;
pub mod error;
pub mod hooks;
pub mod listen;
mod openapi;
pub mod schedules;
pub mod services;
mod sse;
mod ui;
mod web;
pub mod workers;

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use skiff_core::catalog::Catalog;
use skiff_core::dispatch::Dispatcher;
use skiff_core::store::{AuthStore, Store};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The largest request body accepted (a trigger with its params is a few KiB).
pub const MAX_BODY: usize = 256 << 10;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// SHA-256 of `SKIFF_ADMIN_TOKEN`, when one was given.
    pub admin_token_hash: Option<String>,
    /// Mark session cookies `Secure` (the server is reached over https).
    pub secure_cookies: bool,
    /// Shown on the dashboard when steps run with skiff's own powers (not isolated).
    pub steps_warning: Option<String>,
    /// The largest webhook delivery accepted (`--hooks-max-body`).
    pub hooks_max_body: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            admin_token_hash: None,
            secure_cookies: false,
            steps_warning: None,
            hooks_max_body: hooks::DEFAULT_MAX_BODY,
        }
    }
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
            let options = current.options.clone();
            let stale = tokio::task::spawn_blocking(move || current.is_stale())
                .await
                .unwrap_or(false);
            if stale
                && let Ok(fresh) =
                    tokio::task::spawn_blocking(move || Catalog::load_with(&dir, &options)).await
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
    /// skiff's secrets: the server checks webhook signatures with them.
    pub secrets: Arc<skiff_core::secrets::Secrets>,
    /// What the Services view asks engines (`services::EngineView`); None: states unknown.
    pub engines: Option<Arc<dyn services::EngineView>>,
    /// Who executes runs (`workers::WorkersView`); None: not known.
    pub workers: Option<Arc<dyn workers::WorkersView>>,
}

/// The API: every route here is in the OpenAPI document, by construction (`routes!` registers a
/// handler and its `#[utoipa::path]` together).
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(api::healthz))
        .routes(routes!(api::metrics))
        .routes(routes!(openapi::document))
        .routes(routes!(api::list_pipelines))
        .routes(routes!(api::get_pipeline))
        .routes(routes!(api::trigger))
        .routes(routes!(api::list_runs))
        .routes(routes!(api::get_run))
        .routes(routes!(api::read_logs))
        .routes(routes!(api::stream_logs))
        .routes(routes!(api::cancel))
        .routes(routes!(api::rerun))
        .routes(routes!(api::list_tokens, api::create_token))
        .routes(routes!(api::revoke_token))
        .routes(routes!(api::list_services))
        .routes(routes!(api::act_on_service))
        .routes(routes!(api::list_resources))
        .routes(routes!(workers::list_workers))
        .routes(routes!(hooks::receive))
        .routes(routes!(hooks::list_deliveries))
        .routes(routes!(hooks::get_delivery))
        .routes(routes!(hooks::redeliver_delivery))
}

/// The web UI's pages and forms (not part of the API document).
fn pages() -> Router<AppState> {
    Router::new()
        .route("/", get(ui::dashboard))
        .route("/login", get(ui::login_form).post(ui::login))
        .route(
            "/login/link/{token}",
            get(ui::login_link).head(ui::login_link_head),
        )
        .route("/logout", post(ui::logout))
        .route("/pipelines/{name}", get(ui::pipeline))
        .route("/pipelines/{name}/run", post(ui::run_pipeline))
        .route("/runs", get(ui::runs))
        .route("/services", get(ui::services))
        .route("/workers", get(ui::workers))
        .route("/services/live", get(ui::services_live))
        .route("/services/{name}/{action}", post(ui::act_on_service))
        .route("/deliveries", get(ui::deliveries))
        .route("/deliveries/{key}", get(ui::delivery))
        .route("/deliveries/{key}/redeliver", post(ui::redeliver))
        .route("/runs/{id}", get(ui::run))
        .route("/runs/{id}/log", get(ui::log_page))
        .route("/runs/{id}/log.txt", get(ui::raw_log))
        .route("/runs/{id}/cancel", post(ui::cancel_run))
        .route("/runs/{id}/rerun", post(ui::rerun_run))
        .route("/settings", get(ui::settings))
        .route("/settings/password", post(ui::set_password))
        .route("/settings/tokens", post(ui::create_token))
        .route("/settings/tokens/{id}/revoke", post(ui::revoke_token))
        .route("/static/{*path}", get(ui::static_file))
        .route("/favicon.ico", get(ui::favicon))
}

/// Every route, before the layers and the state: the API and the pages, with the JSON 404 and
/// 405 (the 405 keeps axum's `Allow` header).
pub fn routes() -> Router<AppState> {
    let (api, _) = api_routes().split_for_parts();
    api.merge(pages())
        .fallback(api::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
}

/// What `--hooks-listen` serves: `/hooks/{id}` and nothing else (the UI and the API stay on
/// the private listener), with the same error bodies and security headers.
pub fn hooks_app(state: AppState) -> Router {
    Router::new()
        .route("/hooks/{id}", post(hooks::receive))
        .fallback(api::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(listen::body_deadline))
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(axum::middleware::from_fn(web::security_headers))
        .with_state(state)
}

/// The whole HTTP surface. Every error of the API is the JSON error body: handlers answer
/// `ApiError`, and `json_errors` rewrites what axum answers by itself (a rejection, say) the
/// same way; `html_errors` then turns a page's error into an HTML page with a way back. Every
/// answer carries the security headers; pages, CSS, JS and JSON are gzipped for clients that
/// ask (never the live log stream).
pub fn app(state: AppState) -> Router {
    routes()
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(listen::body_deadline))
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(axum::middleware::from_fn(web::html_errors))
        .layer(axum::middleware::from_fn(web::security_headers))
        .layer(web::compression())
        .with_state(state)
}
