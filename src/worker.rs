//! `skiff worker`: executes runs from the distributed queue on this machine. It serves the label
//! sets its labels cover, holds its own secrets file, beats in Redis's worker registry, and never
//! serves HTTP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use skiff_core::store::Store;
use skiff_worker::pool::{Stopping, WorkerConfig};
use skiff_worker::secrets::Secrets;
use tokio_util::sync::CancellationToken;

use crate::cli_run::parse_duration;
use crate::redis_args::RedisArgs;
use crate::runs::{Handler, end_leftover_processes, recover_abandoned_runs, wait_for_signal};

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// The labels of this worker (comma-separated): it takes the runs whose `runs_on` it has
    /// every label of, and runs without `runs_on`; `docker` is added when the engine answers
    #[arg(
        long,
        env = "SKIFF_LABELS",
        value_delimiter = ',',
        value_name = "LABELS"
    )]
    labels: Vec<String>,
    /// How many runs it executes at once
    #[arg(long, env = "SKIFF_CONCURRENCY", default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Its name in the registry and in the runs it claims [default: HOST-PID-RANDOM]
    #[arg(long, env = "SKIFF_WORKER_NAME", value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    lease: crate::LeaseArgs,
    #[command(flatten)]
    isolation: crate::IsolationArgs,
    #[command(flatten)]
    config: crate::ConfigArgs,
    /// This worker's own file of secrets as NAME=value lines, readable by its owner only
    #[arg(long, env = "SKIFF_SECRETS_FILE", value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Time a stopped step gets between SIGTERM and SIGKILL
    #[arg(long, env = "SKIFF_KILL_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    kill_grace: Duration,
    /// When stopping, how long running runs get to end by themselves before they are cancelled
    /// (their finally steps then run here)
    #[arg(long, env = "SKIFF_STOP_WAIT", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    stop_wait: Duration,
}

pub fn main(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(work(args))
}

async fn work(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    skiff_worker::isolation::harden_this_process();
    let redis = args
        .redis
        .resolve()?
        .ok_or_else(|| anyhow::anyhow!("skiff worker needs Redis: --redis URL (or SKIFF_REDIS)"))?;
    eprintln!("skiff: {}", skiff_worker::process_tracking()?.description());
    let secrets = Secrets::load(std::env::vars(), args.secrets.as_deref())?;
    let config = args.config.read()?;
    let tools = crate::tools(config, &secrets)?;
    // No data folder here; the secrets and password files are private to skiff's user (checked
    // when read), and isolated steps run as other users.
    let (workspaces, isolation) = args.isolation.resolve_protecting(&[])?;
    let store = crate::distributed::open_store(&redis).await?;
    let store: Arc<dyn Store> = Arc::new(store);
    let labels = crate::distributed::labels(&args.labels, &tools, &[]).await;
    let name = args
        .name
        .clone()
        .unwrap_or_else(skiff_redis::workers::default_name);
    let stopping = Stopping::default();
    let handler = Arc::new(Handler {
        store: store.clone(),
        config: WorkerConfig {
            workspace_root: workspaces,
            isolation,
            allow_docker_steps: args.isolation.allow_docker_steps,
            spares: Default::default(),
            tools,
            kill_grace: args.kill_grace,
            secrets,
            cancel_check: Duration::from_secs(1),
            name: name.clone(),
            lease: args.lease.lease,
        },
        stopping: stopping.clone(),
        labels: Some(labels.clone()),
        requeue: Some(Arc::new(skiff_redis::queue::RedisQueue::new(
            crate::distributed::manager(&redis).await?,
        ))),
    });
    let stop_taking = CancellationToken::new();
    let queue = crate::distributed::work(
        &redis,
        handler.clone(),
        args.concurrency,
        false,
        stop_taking.clone(),
    )
    .await?;
    tokio::spawn(recover_abandoned_runs(handler.clone()));
    if let Some(handle) = crate::metrics::install() {
        tokio::spawn(crate::distributed::report_metrics(
            skiff_redis::workers::Registry::new(crate::distributed::manager(&redis).await?),
            name.clone(),
            handle,
            Duration::from_secs(5),
            stop_taking.clone(),
        ));
    }
    eprintln!(
        "skiff: worker {name} takes runs for labels [{}], {} at once",
        labels.iter().cloned().collect::<Vec<_>>().join(", "),
        args.concurrency
    );
    crate::drop_start_up_code();
    wait_for_signal().await;
    eprintln!(
        "skiff: stopping: taking no more runs; running runs get {} to end",
        skiff_core::duration::human(args.stop_wait)
    );
    stop_taking.cancel();
    let running = stopping.running.clone();
    running.close();
    if tokio::time::timeout(args.stop_wait, running.wait())
        .await
        .is_err()
    {
        eprintln!("skiff: cancelling the runs still running; their finally steps run here");
        stopping.cancel.cancel();
        if tokio::time::timeout(args.kill_grace + args.stop_wait, running.wait())
            .await
            .is_err()
        {
            stopping.abort.cancel();
            if tokio::time::timeout(args.kill_grace + Duration::from_secs(5), running.wait())
                .await
                .is_err()
            {
                let left = end_leftover_processes(&handler).await;
                eprintln!(
                    "skiff: {left} runs did not end; their processes were ended, and another worker finishes their records once their lease runs out"
                );
            }
        }
    }
    stopping.cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(5), queue)
        .await
        .is_err()
    {
        tracing::warn!("the worker's queue did not stop within 5s");
    }
    skiff_worker::release_cgroups();
    Ok(ExitCode::SUCCESS)
}
