//! `skiff serve`: the embedded deployment. One process: the HTTP server, the SQLite Store and
//! queue, and in-process workers that take jobs through the same queue remote workers will use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skiff_core::catalog::Catalog;
use skiff_core::dispatch::{Dispatcher, RunJob};
use skiff_core::queue::{JobHandler, SqliteQueue};
use skiff_core::store::{AuthStore, Store};
use skiff_server::{AppState, CatalogHandle, ServerConfig};
use skiff_worker::pool::{WorkerConfig, handle_job};
use skiff_worker::secrets::Secrets;
use tokio_util::sync::CancellationToken;

use crate::DataArgs;
use crate::cli_run::parse_duration;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; binds loopback unless told otherwise
    #[arg(
        long,
        env = "SKIFF_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// Folder of pipeline files, reloaded when a file changes
    #[arg(
        long,
        env = "SKIFF_PIPELINES",
        default_value = "pipelines",
        value_name = "DIR"
    )]
    pipelines: PathBuf,
    /// How many runs the in-process workers execute at once
    #[arg(long, env = "SKIFF_WORKERS", default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    #[command(flatten)]
    data: DataArgs,
    /// A file of secrets as NAME=value lines, readable by its owner only (mode 600)
    #[arg(long, env = "SKIFF_SECRETS_FILE", value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Time a stopped step gets between SIGTERM and SIGKILL
    #[arg(long, env = "SKIFF_KILL_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    kill_grace: Duration,
    /// The URL people reach this server at, for the login link (default: http://ADDR)
    #[arg(long, env = "SKIFF_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// An admin API token accepted as `Authorization: Bearer`, for automation (at least 16 characters)
    #[arg(
        long = "admin-token",
        env = "SKIFF_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// How often the pipelines folder is checked for changes
    #[arg(long, env = "SKIFF_RELOAD_EVERY", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    reload_every: Duration,
}

/// How long stopping waits for cancelled runs to finish their finally steps.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

/// The in-process workers' job handler.
struct Embedded {
    store: Arc<dyn Store>,
    config: WorkerConfig,
    shutdown: CancellationToken,
    /// Runs in progress, so that stopping waits for them (and their finally steps), not for the
    /// queue worker's own shutdown, which can sit out a 30 s heartbeat.
    running: tokio_util::task::TaskTracker,
}

#[async_trait::async_trait]
impl JobHandler for Embedded {
    async fn handle(&self, job: RunJob) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            // Not claimed: the run stays queued and is queued again at the next start.
            return Err("skiff is stopping; the run will start after the next start".into());
        }
        let _running = self.running.token();
        handle_job(self.store.clone(), job, &self.config, &self.shutdown)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

pub fn main(args: ServeArgs) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if let Some(t) = &args.admin_token {
        anyhow::ensure!(
            t.len() >= 16,
            "SKIFF_ADMIN_TOKEN must be at least 16 characters"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let secrets = Secrets::load(std::env::vars(), args.secrets.as_deref())?;
    let sqlite = args.data.open_store().await?;
    // A fetch may claim twice the worker's slots: the next jobs are at hand when a slot frees,
    // instead of a fetch round trip later. The embedded worker is the only one, so it keeps
    // nothing from other workers (remote workers will claim only what they can run).
    let queue = SqliteQueue::open(sqlite.writer(), usize::from(args.workers) * 2)
        .await
        .context("opening the queue")?;
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    let auth: Arc<dyn AuthStore> = Arc::new(sqlite);
    interrupted_runs(store.as_ref(), &args.data.data.join("workspaces")).await?;
    let metrics = crate::metrics::install();

    let catalog = CatalogHandle::new(Catalog::load(&args.pipelines));
    let shown = catalog.current();
    tracing::info!(pipelines = shown.len(), dir = %args.pipelines.display(), "pipelines loaded");
    for e in shown.entries().filter(|e| !e.is_valid()) {
        eprintln!(
            "skiff: pipeline {} is invalid ({} problems); see `skiff validate`",
            e.file.display(),
            e.diagnostics.len()
        );
    }
    tokio::spawn(catalog.clone().watch(args.reload_every));

    let shutdown = CancellationToken::new();
    let handler = Arc::new(Embedded {
        store: store.clone(),
        config: WorkerConfig {
            workspace_root: args.data.data.join("workspaces"),
            kill_grace: args.kill_grace,
            secrets,
            cancel_check: Duration::from_secs(1),
        },
        shutdown: shutdown.clone(),
        running: tokio_util::task::TaskTracker::new(),
    });
    let running = handler.running.clone();
    // The queue worker stops only after the runs it started have ended: they write through the
    // same connection it fetches with.
    let queue_stop = CancellationToken::new();
    let workers = queue.spawn_workers(usize::from(args.workers), handler, queue_stop.clone());
    requeue_waiting_runs(store.as_ref(), &queue).await?;
    let state = AppState {
        store: store.clone(),
        auth: auth.clone(),
        catalog,
        dispatcher: Dispatcher {
            store: store.clone(),
            queue: Arc::new(queue),
        },
        config: Arc::new(ServerConfig {
            admin_token_hash: args
                .admin_token
                .as_deref()
                .map(skiff_server::auth::hash_secret),
            // Behind a TLS proxy (an https public URL), the session cookie never travels in clear.
            secure_cookies: args
                .public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://")),
        }),
        metrics,
        shutdown: shutdown.clone(),
        login_throttle: Arc::default(),
    };
    let base = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    eprintln!(
        "skiff: listening on http://{addr} ({} in-process workers)",
        args.workers
    );
    if auth.password_hash().await?.is_none() {
        let token = skiff_server::auth::issue_login_link(auth.as_ref()).await?;
        eprintln!(
            "skiff: sign in with this one-time link (valid {} minutes), then set a password under Settings:\n  {}/login/link/{token}",
            skiff_server::auth::LOGIN_LINK_MINUTES,
            base.trim_end_matches('/')
        );
    }

    let app = skiff_server::app(state);
    let stop = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        wait_for_signal().await;
        eprintln!(
            "skiff: stopping: cancelling running runs (their finally steps run), then exiting"
        );
        stop.cancel();
    });
    server.await.context("serving HTTP")?;
    shutdown.cancel();
    // The runs were cancelled: wait for them to end (finally steps included), then stop the
    // queue worker without waiting for it to notice.
    running.close();
    if tokio::time::timeout(SHUTDOWN_WAIT, running.wait())
        .await
        .is_err()
    {
        eprintln!(
            "skiff: runs did not end within {}s; exiting anyway",
            SHUTDOWN_WAIT.as_secs()
        );
    }
    queue_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), workers)
        .await
        .is_err()
    {
        tracing::warn!("the queue worker did not stop within 5s");
    }
    Ok(ExitCode::SUCCESS)
}

/// Pushes a job for every run still `queued` in the Store: one whose job was lost or left behind
/// when skiff last stopped. A duplicate job is harmless (claiming a run is atomic).
async fn requeue_waiting_runs(store: &dyn Store, queue: &SqliteQueue) -> anyhow::Result<()> {
    use skiff_core::dispatch::Queue;
    use skiff_core::run::RunStatus;
    use skiff_core::store::RunQuery;
    let mut cursor = None;
    loop {
        let page = store
            .list_runs(&RunQuery {
                status: Some(RunStatus::Queued),
                limit: 500,
                cursor,
                ..RunQuery::default()
            })
            .await?;
        for run in &page.runs {
            queue.push(RunJob::new(&run.id)).await?;
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// In the embedded deployment this process is the only worker, so a run still `running` at start
/// was interrupted when skiff last stopped without finishing it (a crash, a kill -9). Say so,
/// rather than leave it running forever, and end the step processes it left behind.
async fn interrupted_runs(store: &dyn Store, workspaces: &std::path::Path) -> anyhow::Result<()> {
    use skiff_core::run::RunStatus;
    use skiff_core::store::RunQuery;
    loop {
        let page = store
            .list_runs(&RunQuery {
                status: Some(RunStatus::Running),
                limit: 500,
                ..RunQuery::default()
            })
            .await?;
        if page.runs.is_empty() {
            return Ok(());
        }
        for run in &page.runs {
            let reason = "interrupted: skiff stopped while this run was running (its finally steps did not run)";
            store
                .set_status(&run.id, RunStatus::Failed, Some(reason))
                .await?;
            let reaped = skiff_worker::clean_up_interrupted(workspaces, &run.id);
            eprintln!(
                "skiff: run {} #{} was interrupted by the last stop; marked failed{}",
                run.pipeline,
                run.number,
                if reaped {
                    ", and its leftover processes ended"
                } else {
                    ""
                }
            );
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
