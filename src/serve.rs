//! `skiff serve`: the embedded deployment. One process: the HTTP server, the SQLite Store and
//! queue, and in-process workers that take jobs through the same queue remote workers will use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skiff_core::catalog::Catalog;
use skiff_core::dispatch::{Dispatcher, Queue};
use skiff_core::queue::SqliteQueue;
use skiff_core::retention::{Retention, SWEEP_EVERY, sweep};
use skiff_core::run::RunStatus;
use skiff_core::store::{AuthStore, Store, runs_in};
use skiff_redis::queue::RedisQueue;
use skiff_server::{AppState, CatalogHandle, ServerConfig};
use skiff_worker::pool::{Stopping, WorkerConfig};
use skiff_worker::secrets::Secrets;
use tokio_util::sync::CancellationToken;

use crate::DataArgs;
use crate::cli_run::parse_duration;
use crate::runs::{
    Handler, Interrupted, SERVE_WORKER, end_leftover_processes, finish_interrupted_runs,
    recover_abandoned_runs, wait_for_signal,
};

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
    /// How many runs the in-process workers execute at once (with --redis, 0: none, the server
    /// only serves)
    #[arg(long, env = "SKIFF_WORKERS", default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=256))]
    workers: u16,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    redis: crate::redis_args::RedisArgs,
    /// With --redis: labels of the in-process workers besides `local` (and `docker` when the
    /// engine answers), comma-separated
    #[arg(
        long,
        env = "SKIFF_LABELS",
        value_delimiter = ',',
        value_name = "LABELS"
    )]
    labels: Vec<String>,
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

/// The admin token, from SKIFF_ADMIN_TOKEN or a private file; one that could never match a
/// `Authorization: Bearer` header (too short, a space, a character outside printable ASCII) is a
/// start error, not a silent lock-out.
fn admin_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some((token, from)) = crate::credential(
        file,
        "SKIFF_ADMIN_TOKEN",
        "--admin-token-file",
        "the admin token",
    )?
    else {
        return Ok(None);
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
    let backend = match args.redis.resolve()? {
        None => {
            anyhow::ensure!(
                args.workers > 0,
                "--workers 0 leaves nobody to run anything: the embedded deployment needs at \
                 least one in-process worker (0 is for a server on --redis, beside `skiff worker`s)"
            );
            let data = args.data.open().await?;
            let lock = data.lock_for_serve()?;
            // A fetch takes up to eight times the worker's slots: the next jobs are at hand when
            // a slot frees, instead of a fetch round trip on the writer later (with twice the
            // slots, skiff's CPU in the throughput bench was 1.23 ms a run against 1.09, and
            // 600 runs a second out of reach). A job taken this way is only the run's ticket: the run stays queued
            // (cancellable, in order) until a slot claims it, and the jobs of a stopped server
            // go back in order at the next start. The embedded worker is the only one, so it
            // keeps nothing from other workers.
            let queue = SqliteQueue::open(data.store.writer(), usize::from(args.workers) * 8)
                .await
                .context("opening the queue")?;
            Backend::Embedded {
                data,
                queue,
                _lock: lock,
            }
        }
        Some(redis) => {
            let store = crate::distributed::open_store(&redis).await?;
            let queue = RedisQueue::new(crate::distributed::manager(&redis).await?);
            Backend::Redis {
                store,
                queue,
                redis,
            }
        }
    };
    let (workspaces, isolation) = match &backend {
        Backend::Embedded { data, .. } => args.isolation.resolve(data)?,
        Backend::Redis { .. } => args.isolation.resolve_protecting(&[])?,
    };
    let (store, auth): (Arc<dyn Store>, Arc<dyn AuthStore>) = match &backend {
        Backend::Embedded { data, .. } => {
            (Arc::new(data.store.clone()), Arc::new(data.store.clone()))
        }
        Backend::Redis { store, .. } => (Arc::new(store.clone()), Arc::new(store.clone())),
    };
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
    let handler = Arc::new(Handler {
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
        // The embedded queue has one list: its workers take every run. With Redis they take
        // the label sets their labels cover.
        requeue: match &backend {
            Backend::Embedded { .. } => None,
            Backend::Redis { queue, .. } => Some(Arc::new(queue.clone())),
        },
        labels: match &backend {
            Backend::Embedded { .. } => None,
            Backend::Redis { .. } => {
                Some(crate::distributed::labels(&args.labels, &view_tools, &["local"]).await)
            }
        },
    });
    let running = stopping.running.clone();
    // The queue worker stops only after the runs it started have ended: embedded, they write
    // through the same connection it fetches with.
    let queue_stop = CancellationToken::new();
    let (workers, queue): (tokio::task::JoinHandle<()>, Arc<dyn Queue>) = match &backend {
        Backend::Embedded { queue, data, .. } => {
            finish_interrupted_runs(&handler, Interrupted::AtStart).await?;
            // A group whose runs all ended while its next one was held (a crash between the
            // two) lets it go now.
            data.store.release_stuck_groups().await?;
            requeue_waiting_runs(store.as_ref(), queue).await?;
            let workers = queue.spawn_workers(
                usize::from(args.workers),
                handler.clone(),
                queue_stop.clone(),
            );
            (workers, Arc::new(queue.clone()))
        }
        Backend::Redis { queue, redis, .. } => {
            tokio::spawn(crate::distributed::keep_jobs(
                store.clone(),
                queue.clone(),
                SWEEP_JOBS,
                SWEEP_JOBS,
                stopping.cancel.clone(),
            ));
            let workers = if args.workers == 0 {
                // No in-process workers: the workers take runs over, not this server.
                tokio::spawn(async {})
            } else {
                // Other servers' and workers' runs are theirs while their leases hold.
                finish_interrupted_runs(&handler, Interrupted::Expired).await?;
                tokio::spawn(recover_abandoned_runs(handler.clone()));
                crate::distributed::work(
                    redis,
                    handler.clone(),
                    args.workers,
                    true,
                    queue_stop.clone(),
                )
                .await?
            };
            (workers, Arc::new(queue.clone()))
        }
    };
    if matches!(backend, Backend::Embedded { .. }) {
        tokio::spawn(recover_abandoned_runs(handler.clone()));
    }
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
            queue,
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
        login_throttle: match &backend {
            Backend::Embedded { .. } => Arc::default(),
            Backend::Redis { redis, .. } => Arc::new(skiff_server::auth::LoginThrottle::shared(
                Arc::new(crate::distributed::SharedAttempts(
                    skiff_redis::throttle::Attempts::new(crate::distributed::manager(redis).await?),
                )),
            )),
        },
        secrets: Arc::new(handler.config.secrets.clone()),
        workers: Some(match &backend {
            Backend::Embedded { .. } => {
                let info = crate::distributed::info(&handler, args.workers, true);
                let started = info.started_at;
                Arc::new(crate::distributed::EmbeddedView(crate::distributed::seen(
                    info, started, false, true,
                )))
            }
            Backend::Redis { redis, .. } => Arc::new(crate::distributed::RegistryView(
                skiff_redis::workers::Registry::new(crate::distributed::manager(redis).await?),
            )),
        }),
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
    match &backend {
        Backend::Embedded { data, .. } => {
            // `skiff login-link` (and `skiff trigger`) find this server through its data
            // folder.
            crate::write_server_url(&data.dir, &base);
            eprintln!(
                "skiff: listening on http://{addr} ({} in-process workers; data in {})",
                args.workers,
                data.dir.display()
            );
        }
        Backend::Redis { .. } => eprintln!(
            "skiff: listening on http://{addr} ({} in-process workers with labels [{}]; data in Redis at {})",
            args.workers,
            handler
                .labels
                .iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            args.redis.redis.as_deref().unwrap_or_default()
        ),
    }
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
    crate::drop_start_up_code();
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
            let left = end_leftover_processes(&handler).await;
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
    if let Backend::Embedded { data, .. } = &backend
        && let Err(e) = data.store.close().await
    {
        tracing::warn!(error = %e, "closing the store failed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the data and the queue are.
enum Backend {
    /// A data folder (held by its lock) with the SQLite Store and queue.
    Embedded {
        data: crate::Data,
        queue: SqliteQueue,
        _lock: std::fs::File,
    },
    /// Redis, shared with other servers and workers.
    Redis {
        store: skiff_redis::RedisStore,
        queue: RedisQueue,
        redis: crate::redis_args::Redis,
    },
}

/// How often a distributed server looks for waiting runs whose job was lost (and how long a run
/// waits before it counts as such).
const SWEEP_JOBS: Duration = Duration::from_secs(10);

/// Gives every run still `queued` in the Store a job, in the order the runs were created, in
/// place of the jobs the last process left (see [`SqliteQueue::requeue_in_order`]).
async fn requeue_waiting_runs(store: &dyn Store, queue: &SqliteQueue) -> anyhow::Result<()> {
    // Held runs wait for their group: they get their job when it lets them go.
    let waiting: Vec<_> = runs_in(store, RunStatus::Queued)
        .await?
        .into_iter()
        .filter(|r| !r.held)
        .map(|r| (r.id, r.created_at))
        .collect();
    queue.requeue_in_order(&waiting).await?;
    Ok(())
}
