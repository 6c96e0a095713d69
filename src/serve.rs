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
use skiff_core::retention::{Retention, SWEEP_EVERY, sweep};
use skiff_core::run::{Run, RunStatus};
use skiff_core::store::{AuthStore, Store};
use skiff_core::store::{RunQuery, StoreError, TakeOver};
use skiff_server::{AppState, CatalogHandle, ServerConfig};
use skiff_worker::pool::{Stopping, WorkerConfig, finish_interrupted_run, handle_job};
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
    #[command(flatten)]
    lease: crate::LeaseArgs,
    #[command(flatten)]
    isolation: crate::IsolationArgs,
    #[command(flatten)]
    config: crate::ConfigArgs,
    /// A file of secrets as NAME=value lines, readable by its owner only (mode 600)
    #[arg(long, env = "SKIFF_SECRETS_FILE", value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Time a stopped step gets between SIGTERM and SIGKILL
    #[arg(long, env = "SKIFF_KILL_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    kill_grace: Duration,
    /// The URL people reach this server at, for the login link (default: http://ADDR)
    #[arg(long, env = "SKIFF_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// Refused: a flag shows in /proc/PID/cmdline to every local user (use SKIFF_ADMIN_TOKEN or
    /// --admin-token-file)
    #[arg(long = "admin-token", hide = true, value_name = "TOKEN")]
    admin_token_flag: Option<String>,
    /// A file (mode 600) holding an admin API token, accepted as `Authorization: Bearer`, for
    /// automation; or the token itself in SKIFF_ADMIN_TOKEN (at least 16 printable ASCII
    /// characters, no spaces)
    #[arg(long, env = "SKIFF_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Finished runs older than this are deleted with their logs (`off`: kept however old);
    /// a pipeline's `retention.max_age` overrides it
    #[arg(long, env = "SKIFF_RETENTION_MAX_AGE", default_value = "90d", value_parser = parse_max_age, value_name = "DURATION")]
    retention_max_age: MaxAge,
    /// At most this many finished runs of each pipeline are kept (`off`: no limit); a
    /// pipeline's `retention.max_runs` overrides it
    #[arg(long, env = "SKIFF_RETENTION_MAX_RUNS", default_value = "1000", value_parser = parse_max_runs, value_name = "N")]
    retention_max_runs: MaxRuns,
    /// When stopping, how long cancelled runs get to finish their finally steps before those
    /// are stopped too
    #[arg(long, env = "SKIFF_STOP_WAIT", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    stop_wait: Duration,
    /// How often the pipelines folder is checked for changes
    #[arg(long, env = "SKIFF_RELOAD_EVERY", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    reload_every: Duration,
    /// A second address that serves webhooks (`POST /hooks/ID`) and nothing else, to expose to
    /// the internet while --listen stays private
    #[arg(long, env = "SKIFF_HOOKS_LISTEN", value_name = "ADDR")]
    hooks_listen: Option<SocketAddr>,
    /// The largest webhook delivery accepted, in bytes (413 above it)
    #[arg(long, env = "SKIFF_HOOKS_MAX_BODY", default_value_t = skiff_server::hooks::DEFAULT_MAX_BODY, value_name = "BYTES", value_parser = parse_max_body)]
    hooks_max_body: usize,
}

fn parse_max_body(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1024..=64 << 20).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a byte count from 1024 to 67108864"
        )),
    }
}

/// `--retention-max-age`: a duration, or `off`.
#[derive(Debug, Clone, Copy)]
struct MaxAge(Option<Duration>);

/// `--retention-max-runs`: a count, or `off`.
#[derive(Debug, Clone, Copy)]
struct MaxRuns(Option<u32>);

fn parse_max_age(text: &str) -> Result<MaxAge, String> {
    if text == "off" {
        return Ok(MaxAge(None));
    }
    match skiff_core::duration::parse_up_to(text, Retention::MAX_AGE)? {
        age if age >= Retention::MIN_AGE => Ok(MaxAge(Some(age))),
        _ => Err(format!("`{text}` is less than an hour")),
    }
}

fn parse_max_runs(text: &str) -> Result<MaxRuns, String> {
    match text {
        "off" => Ok(MaxRuns(None)),
        n => match n.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(MaxRuns(Some(n))),
            _ => Err(format!("`{text}` is not a count of at least 1, or `off`")),
        },
    }
}

/// Applies retention at start and every [`SWEEP_EVERY`] until `stop` fires.
async fn keep_retention(
    store: Arc<dyn Store>,
    catalog: CatalogHandle,
    defaults: Retention,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let current = catalog.current();
        let policy = |name: &str| -> Option<Retention> {
            current
                .get(name)
                .and_then(|e| e.pipeline.as_ref())
                .map(|p| p.retention)
        };
        if let Err(e) = sweep(store.as_ref(), defaults, &policy).await {
            tracing::warn!(error = %e, "applying retention failed");
        }
        let cut = chrono::Utc::now() - skiff_server::hooks::KEEP_DELIVERIES;
        if let Err(e) = store.prune_deliveries(cut).await {
            tracing::warn!(error = %e, "pruning the deliveries log failed");
        }
    }
}

/// The in-process workers' job handler.
struct Embedded {
    store: Arc<dyn Store>,
    config: WorkerConfig,
    stopping: Stopping,
    /// Runs in progress, so that stopping waits for them (and their finally steps), not for the
    /// queue worker's own shutdown, which can sit out a 30 s heartbeat.
    running: tokio_util::task::TaskTracker,
}

#[async_trait::async_trait]
impl JobHandler for Embedded {
    async fn handle(&self, job: RunJob) -> Result<(), String> {
        if self.stopping.cancel.is_cancelled() {
            // Not claimed: the run stays queued and is queued again, in order, at the next start.
            return Err("skiff is stopping; the run will start after the next start".into());
        }
        let _running = self.running.token();
        handle_job(self.store.clone(), job, &self.config, &self.stopping)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The admin token, from SKIFF_ADMIN_TOKEN or a private file; one that could never match a
/// `Authorization: Bearer` header (too short, a space, a character outside printable ASCII) is a
/// start error, not a silent lock-out.
fn admin_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let (token, from) = match (file, std::env::var("SKIFF_ADMIN_TOKEN")) {
        (Some(_), Ok(_)) => anyhow::bail!(
            "give the admin token in SKIFF_ADMIN_TOKEN or in --admin-token-file, not both"
        ),
        (Some(path), _) => {
            use std::os::unix::fs::PermissionsExt;
            let meta =
                std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
            anyhow::ensure!(
                meta.permissions().mode() & 0o077 == 0,
                "{} is readable by others (mode {:o}): make it private (chmod 600)",
                path.display(),
                meta.permissions().mode() & 0o777
            );
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            (
                text.trim_end_matches(['\n', '\r']).to_string(),
                path.display().to_string(),
            )
        }
        (None, Ok(t)) => (t, "SKIFF_ADMIN_TOKEN".to_string()),
        (None, Err(std::env::VarError::NotPresent)) => return Ok(None),
        (None, Err(std::env::VarError::NotUnicode(_))) => {
            anyhow::bail!("SKIFF_ADMIN_TOKEN is not valid text")
        }
    };
    anyhow::ensure!(
        token.chars().count() >= 16,
        "the admin token ({from}) must be at least 16 characters"
    );
    anyhow::ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "the admin token ({from}) may hold only printable ASCII characters without spaces: no \
         other token can ever match it in an Authorization header"
    );
    Ok(Some(token))
}

pub fn main(args: ServeArgs) -> anyhow::Result<ExitCode> {
    keep_freed_memory();
    crate::runtime()?.block_on(serve(args))
}

/// glibc gives every allocation over 128 KiB its own mapping, unmapped on free, and trims the
/// threads' heaps as soon as their top is free: a webhook's 1 MiB body then costs its pages
/// faulted in and cleared again at each delivery (measured: 1.9 ms of a 4.7 ms delivery).
/// Buffers up to 4 MiB come from the heap instead, and up to 8 MiB freed stays for the next.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, and a refused setting (0) leaves glibc's default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Not dumpable (its environment and memory out of reach of its uid's other processes);
    // what it creates, private.
    skiff_worker::isolation::harden_this_process();
    anyhow::ensure!(
        args.admin_token_flag.is_none(),
        "--admin-token is refused: a command line is readable by every local user \
         (/proc/PID/cmdline); pass the token in SKIFF_ADMIN_TOKEN or in a file given to \
         --admin-token-file"
    );
    let admin_token = admin_token(args.admin_token_file.as_deref())?;
    eprintln!("skiff: {}", skiff_worker::process_tracking()?.description());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let hooks_listener = match args.hooks_listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("binding {at} (--hooks-listen)"))?,
        ),
        None => None,
    };
    let secrets = Secrets::load(std::env::vars(), args.secrets.as_deref())?;
    let config = args.config.read()?;
    let load_options = config.load_options();
    let tools = crate::tools(config, &secrets)?;
    let view_tools = tools.clone();
    let data = args.data.open().await?;
    let (workspaces, isolation) = args.isolation.resolve(&data)?;
    let _lock = data.lock_for_serve()?;
    let sqlite = data.store.clone();
    // A fetch may claim twice the worker's slots: the next jobs are at hand when a slot frees,
    // instead of a fetch round trip later. The embedded worker is the only one, so it keeps
    // nothing from other workers (remote workers will claim only what they can run).
    let queue = SqliteQueue::open(sqlite.writer(), usize::from(args.workers) * 2)
        .await
        .context("opening the queue")?;
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    let auth: Arc<dyn AuthStore> = Arc::new(sqlite.clone());
    let metrics = crate::metrics::install();

    let catalog = CatalogHandle::new(Catalog::load_with(&args.pipelines, &load_options));
    let shown = catalog.current();
    tracing::info!(pipelines = shown.len(), dir = %args.pipelines.display(), "pipelines loaded");
    for e in shown.entries().filter(|e| !e.is_valid()) {
        eprintln!(
            "skiff: pipeline {} is invalid ({}); see `skiff validate`",
            e.file.display(),
            skiff_core::diag::problems(e.diagnostics.len())
        );
    }
    tokio::spawn(catalog.clone().watch(args.reload_every));

    let stopping = Stopping::default();
    let handler = Arc::new(Embedded {
        store: store.clone(),
        config: WorkerConfig {
            workspace_root: workspaces.clone(),
            isolation: isolation.clone(),
            allow_docker_steps: args.isolation.allow_docker_steps,
            spares: Default::default(),
            tools,
            kill_grace: args.kill_grace,
            secrets,
            cancel_check: Duration::from_secs(1),
            name: format!(
                "{SERVE_WORKER}{}-{}",
                std::process::id(),
                chrono::Utc::now().timestamp_millis()
            ),
            lease: args.lease.lease,
        },
        stopping: stopping.clone(),
        running: tokio_util::task::TaskTracker::new(),
    });
    let running = handler.running.clone();
    finish_interrupted_runs(&handler, true).await?;
    tokio::spawn(recover_abandoned_runs(handler.clone()));
    requeue_waiting_runs(store.as_ref(), &queue).await?;
    // The queue worker stops only after the runs it started have ended: they write through the
    // same connection it fetches with.
    let queue_stop = CancellationToken::new();
    let workers = queue.spawn_workers(
        usize::from(args.workers),
        handler.clone(),
        queue_stop.clone(),
    );
    tokio::spawn(keep_retention(
        store.clone(),
        catalog.clone(),
        Retention {
            max_age: args.retention_max_age.0,
            max_runs: args.retention_max_runs.0,
        },
        stopping.cancel.clone(),
    ));
    let state = AppState {
        store: store.clone(),
        auth: auth.clone(),
        catalog,
        dispatcher: Dispatcher {
            store: store.clone(),
            queue: Arc::new(queue),
        },
        config: Arc::new(ServerConfig {
            admin_token_hash: admin_token.as_deref().map(skiff_server::auth::hash_secret),
            // Behind a TLS proxy (an https public URL), the session cookie never travels in clear.
            secure_cookies: args.public_url.as_deref().is_some_and(|u| {
                u.get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            }),
            steps_warning: (!isolation.is_on()).then(|| isolation.description()),
            hooks_max_body: args.hooks_max_body,
        }),
        metrics,
        shutdown: stopping.cancel.clone(),
        login_throttle: Arc::default(),
        secrets: Arc::new(handler.config.secrets.clone()),
        engines: Some(Arc::new(crate::engines::Engines {
            tools: view_tools,
            store: store.clone(),
        })),
    };
    tokio::spawn(skiff_server::schedules::keep_schedules(
        state.catalog.clone(),
        state.dispatcher.clone(),
        stopping.cancel.clone(),
    ));
    if let Some(hooks) = hooks_listener {
        let at = hooks.local_addr()?;
        eprintln!("skiff: webhooks on http://{at}/hooks/ID (nothing else is served there)");
        let app = skiff_server::hooks_app(state.clone());
        let stop = stopping.cancel.clone();
        tokio::spawn(async move {
            let stopped = async move { stop.cancelled().await };
            if let Err(e) =
                skiff_server::listen::serve(hooks, app, stopped, Duration::from_secs(5)).await
            {
                tracing::error!(error = %e, "the webhooks listener failed");
            }
        });
    }
    let base = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    // `skiff login-link` (and `skiff trigger`) find this server through its data folder.
    crate::write_server_url(&data.dir, &base);
    eprintln!(
        "skiff: listening on http://{addr} ({} in-process workers; data in {})",
        args.workers,
        data.dir.display()
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
    let stop = stopping.cancel.clone();
    skiff_server::listen::serve(
        listener,
        app,
        async move {
            wait_for_signal().await;
            eprintln!(
                "skiff: stopping: cancelling running runs (their finally steps run), then exiting"
            );
            stop.cancel();
        },
        Duration::from_secs(5),
    )
    .await
    .context("serving HTTP")?;
    stopping.cancel.cancel();
    // The runs were cancelled: wait for them to end (finally steps included). Finally steps that
    // are still running after the wait are stopped too (their records say so), and as a last
    // resort whatever a run left is ended here, so that no step process outlives skiff.
    running.close();
    if tokio::time::timeout(args.stop_wait, running.wait())
        .await
        .is_err()
    {
        eprintln!(
            "skiff: runs did not end within {}; stopping their finally steps",
            skiff_core::duration::human(args.stop_wait)
        );
        stopping.abort.cancel();
        if tokio::time::timeout(args.kill_grace + Duration::from_secs(5), running.wait())
            .await
            .is_err()
        {
            let left = end_leftover_processes(store.as_ref(), &handler.config.workspace_root).await;
            eprintln!(
                "skiff: {left} runs did not end; their processes were ended, and the next start finishes their records"
            );
        }
    }
    queue_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), workers)
        .await
        .is_err()
    {
        tracing::warn!("the queue worker did not stop within 5s");
    }
    skiff_worker::release_cgroups();
    if let Err(e) = sqlite.close().await {
        tracing::warn!(error = %e, "closing the store failed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Every run in `status`, oldest first.
async fn runs_in(store: &dyn Store, status: RunStatus) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_runs(&RunQuery {
                status: Some(status),
                limit: 500,
                cursor,
                ..RunQuery::default()
            })
            .await?;
        runs.extend(page.runs);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    runs.reverse();
    Ok(runs)
}

/// Gives every run still `queued` in the Store a job, in the order the runs were created, in
/// place of the jobs the last process left (see [`SqliteQueue::requeue_in_order`]).
async fn requeue_waiting_runs(store: &dyn Store, queue: &SqliteQueue) -> anyhow::Result<()> {
    let waiting: Vec<_> = runs_in(store, RunStatus::Queued)
        .await?
        .into_iter()
        .map(|r| (r.id, r.created_at))
        .collect();
    queue.requeue_in_order(&waiting).await?;
    Ok(())
}

/// The start of the names of the in-process workers of `skiff serve`.
const SERVE_WORKER: &str = "serve:";

/// Finishes the runs whose worker is gone: their leftover processes are ended, then each is
/// finished the way a run ends (its unfinished steps recorded truthfully and its `finally` steps
/// run, see `finish_interrupted`), beside the queue. At start (`at_start`), a run held by the
/// in-process workers of an earlier `skiff serve` on this data folder is taken over whatever its
/// lease: this process holds the data folder's lock, so that server is gone. Any other run (a
/// `skiff run` on the same data folder) is taken over only once its lease has run out: its
/// worker stopped renewing it.
async fn finish_interrupted_runs(handler: &Arc<Embedded>, at_start: bool) -> anyhow::Result<()> {
    let store = &handler.store;
    for run in runs_in(store.as_ref(), RunStatus::Running).await? {
        let holder = run.claimed_by.clone().unwrap_or_default();
        if holder == handler.config.name {
            continue;
        }
        let when = if at_start && (holder.is_empty() || holder.starts_with(SERVE_WORKER)) {
            TakeOver::Any
        } else {
            TakeOver::Expired
        };
        let claim = match store
            .take_over_run(&run.id, &handler.config.name, handler.config.lease, when)
            .await
        {
            Ok((_, claim)) => claim,
            // Its worker is alive (or the run ended meanwhile).
            Err(StoreError::Held { .. } | StoreError::InvalidTransition { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let reaped = skiff_worker::clean_up_interrupted(&handler.config.workspace_root, &run.id);
        eprintln!(
            "skiff: run {} #{} was interrupted ({}){}; running its finally steps",
            run.pipeline,
            run.number,
            if at_start {
                "skiff stopped while it ran"
            } else {
                "its worker stopped renewing its claim"
            },
            if reaped {
                " and its leftover processes were ended"
            } else {
                ""
            }
        );
        let handler = handler.clone();
        let token = handler.running.token();
        tokio::spawn(async move {
            let _running = token;
            if let Err(e) = finish_interrupted_run(
                handler.store.clone(),
                &run,
                claim,
                &handler.config,
                &handler.stopping,
            )
            .await
            {
                tracing::error!(run_id = %run.id, error = %e, "finishing an interrupted run failed");
            }
        });
    }
    Ok(())
}

/// Looks for runs whose worker stopped renewing its claim (a `skiff run` killed with -9), every
/// third of a lease, until skiff stops.
async fn recover_abandoned_runs(handler: Arc<Embedded>) {
    let mut tick = tokio::time::interval(handler.config.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = handler.stopping.cancel.cancelled() => return,
        }
        if let Err(e) = finish_interrupted_runs(&handler, false).await {
            tracing::warn!(error = %e, "looking for abandoned runs failed");
        }
    }
}

/// Ends the processes of every run still `running` (when stopping could not wait any longer);
/// returns how many runs that was.
async fn end_leftover_processes(store: &dyn Store, workspaces: &std::path::Path) -> usize {
    let runs = runs_in(store, RunStatus::Running).await.unwrap_or_default();
    for run in &runs {
        skiff_worker::clean_up_interrupted(workspaces, &run.id);
    }
    runs.len()
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
