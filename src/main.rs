//! The `skiff` binary: subcommands that call into the crates.

mod cli_run;
mod login_link;
mod metrics;
mod serve;
mod trigger;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "A self-hosted job runner: YAML pipelines, a queue, workers, a web UI."
)]
#[command(propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline on this machine, showing its steps and log live
    Run(cli_run::RunArgs),
    /// Check pipeline files and print every problem found, with file, line and column
    Validate(validate::ValidateArgs),
    /// Start the server with its web UI, API and in-process workers (the embedded deployment)
    Serve(serve::ServeArgs),
    /// Start a run on a server (and follow it with --follow)
    Trigger(trigger::TriggerArgs),
    /// Print a new one-time sign-in link for the web UI
    LoginLink(login_link::LoginLinkArgs),
}

/// Options shared by subcommands that keep state.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Folder for skiff's database and run workspaces
    #[arg(
        long = "data",
        env = "SKIFF_DATA",
        default_value = ".skiff",
        value_name = "DIR"
    )]
    pub data: PathBuf,
}

impl DataArgs {
    /// The Store file in the data folder.
    pub fn db(&self) -> PathBuf {
        self.data.join("skiff.db")
    }

    /// Opens the Store in the data folder, creating the folder when missing.
    pub async fn open_store(&self) -> anyhow::Result<skiff_core::store::SqliteStore> {
        use anyhow::Context;
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("creating {}", self.data.display()))?;
        skiff_core::store::SqliteStore::open(&self.db())
            .await
            .context("opening the store")
    }
}

/// The async runtime the long-lived subcommands use: two worker threads (the machine skiff is
/// sized for has two cores).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => cli_run::main(args),
        Command::Validate(args) => validate::main(args),
        Command::Serve(args) => serve::main(args),
        Command::Trigger(args) => trigger::main(args),
        Command::LoginLink(args) => login_link::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
