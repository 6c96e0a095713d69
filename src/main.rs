//! The `skiff` binary: subcommands that call into the crates.

mod cli_run;
mod distributed;
mod engines;
mod login_link;
mod metrics;
mod reap;
mod redis_args;
mod runs;
mod serve;
mod trigger;
mod validate;
mod worker;

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
    /// Execute runs from a distributed skiff's queue on this machine (with `--redis`)
    Worker(worker::WorkerArgs),
    /// Start a run on a server (and follow it with --follow)
    Trigger(trigger::TriggerArgs),
    /// Print a new one-time sign-in link for the web UI
    LoginLink(login_link::LoginLinkArgs),
    /// Create an API token (for `skiff trigger` and scripts) and print it
    Token(login_link::TokenArgs),
    /// Remove from the local Docker engine what runs created and nobody keeps (by the resources
    /// ledger: a service's containers stay until they expire)
    Reap(reap::ReapArgs),
    /// (internal) the first process of a step run in namespaces
    #[command(hide = true)]
    StepInit(StepInitArgs),
}

#[derive(clap::Args, Debug)]
struct StepInitArgs {
    /// A folder to hide from the step
    #[arg(long)]
    hide: Vec<PathBuf>,
    /// A folder of which the step sees only the --keep entries
    #[arg(long)]
    private: Option<PathBuf>,
    /// An entry of the --private folder the step keeps
    #[arg(long)]
    keep: Vec<PathBuf>,
    /// The program and its arguments
    #[arg(last = true, required = true)]
    program: Vec<std::ffi::OsString>,
}

/// Options shared by subcommands that keep state.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Folder for skiff's database, run logs and credentials
    #[arg(
        long = "data",
        env = "SKIFF_DATA",
        default_value = ".skiff",
        value_name = "DIR"
    )]
    pub data: PathBuf,
}

/// Where steps run and as whom (`skiff serve`, `skiff run`).
#[derive(clap::Args, Debug, Clone)]
pub struct IsolationArgs {
    /// Folder for run workspaces, outside the data folder [default: /var/lib/skiff/work as
    /// root, $XDG_RUNTIME_DIR/skiff or /tmp/skiff-UID otherwise]
    #[arg(long, env = "SKIFF_WORKSPACES", value_name = "DIR")]
    pub workspaces: Option<PathBuf>,
    /// Run steps with skiff's own uid and powers (for steps that need root): a step can then
    /// read skiff's data folder and secrets
    #[arg(long, env = "SKIFF_NO_ISOLATION")]
    pub no_isolation: bool,
    /// Give pipelines that ask for `permissions: [docker]` the Docker socket (root on the host:
    /// whoever writes such a pipeline is root here)
    #[arg(long, env = "SKIFF_ALLOW_DOCKER_STEPS")]
    pub allow_docker_steps: bool,
    /// The uids isolated runs run as (skiff as root), FIRST-LAST
    #[arg(long, env = "SKIFF_STEP_UIDS", default_value = "64000-64999", value_parser = parse_uids, value_name = "FIRST-LAST")]
    pub step_uids: std::ops::RangeInclusive<u32>,
}

fn parse_uids(text: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("`{text}` is not FIRST-LAST"))?;
    let (a, b): (u32, u32) = (
        a.trim()
            .parse()
            .map_err(|_| format!("`{a}` is not a uid"))?,
        b.trim()
            .parse()
            .map_err(|_| format!("`{b}` is not a uid"))?,
    );
    if a < 1000 || a > b || b >= 65534 {
        return Err(format!(
            "`{text}`: give a range of unused uids from 1000 to 65533, first to last"
        ));
    }
    Ok(a..=b)
}

impl IsolationArgs {
    /// The workspaces folder (absolute, outside the data folder) and the isolation to use;
    /// says at start which it is.
    pub fn resolve(
        &self,
        data: &Data,
    ) -> anyhow::Result<(PathBuf, skiff_worker::isolation::Isolation)> {
        self.resolve_protecting(std::slice::from_ref(&data.dir))
    }

    /// The same, keeping the steps out of the folders `protected` (skiff's data folder).
    pub fn resolve_protecting(
        &self,
        protected: &[PathBuf],
    ) -> anyhow::Result<(PathBuf, skiff_worker::isolation::Isolation)> {
        use anyhow::Context;
        let dir = self
            .workspaces
            .clone()
            .unwrap_or_else(skiff_worker::isolation::default_workspaces);
        let dir =
            std::path::absolute(&dir).with_context(|| format!("resolving {}", dir.display()))?;
        if let Some(inside) = protected.iter().find(|p| dir.starts_with(p)) {
            anyhow::bail!(
                "the workspaces folder {} is inside {}: steps must not reach skiff's data; give \
                 --workspaces a folder outside it",
                dir.display(),
                inside.display()
            );
        }
        let isolation = skiff_worker::isolation::Isolation::detect(
            self.no_isolation,
            self.step_uids.clone(),
            protected.to_vec(),
        );
        eprintln!("skiff: {}", isolation.description());
        Ok((dir, isolation))
    }
}

/// skiff's config file (`skiff serve`, `skiff run`): registries today.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// skiff's config file (registries); default: skiff.toml in the current folder, if there
    /// is one
    #[arg(long, env = "SKIFF_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

impl ConfigArgs {
    /// The config file (none found: an empty config, which declares nothing). A file named with
    /// `--config` must exist; the default one may not.
    pub fn read(&self) -> anyhow::Result<skiff_core::config::Config> {
        let default = std::path::Path::new("skiff.toml");
        let path = match &self.config {
            Some(path) => Some(path.as_path()),
            None => default.exists().then_some(default),
        };
        match path {
            Some(path) => skiff_core::config::Config::load(path).map_err(anyhow::Error::msg),
            None => Ok(skiff_core::config::Config::default()),
        }
    }
}

/// The config, with the registries' passwords found among `secrets`.
pub fn tools(
    config: skiff_core::config::Config,
    secrets: &skiff_worker::secrets::Secrets,
) -> anyhow::Result<std::sync::Arc<skiff_worker::actions::Tools>> {
    let tools = skiff_worker::actions::Tools::new(config, secrets).map_err(anyhow::Error::msg)?;
    Ok(std::sync::Arc::new(tools))
}

/// The lease on the runs a worker claims (`skiff serve`, `skiff run`).
#[derive(clap::Args, Debug, Clone)]
pub struct LeaseArgs {
    /// How long a run's claim holds unless renewed (it is renewed every third of this); a run
    /// whose worker died is taken over once its claim runs out
    #[arg(long, env = "SKIFF_LEASE", default_value = "15s", value_parser = parse_lease, value_name = "DURATION")]
    pub lease: std::time::Duration,
}

fn parse_lease(text: &str) -> Result<std::time::Duration, String> {
    match skiff_core::duration::parse(text)? {
        d if d >= std::time::Duration::from_millis(300) => Ok(d),
        _ => Err(format!("`{text}` is shorter than 300ms")),
    }
}

impl DataArgs {
    /// Opens the data folder (creating it when missing) and its Store. The folder is resolved to
    /// an absolute path here, once: steps run in their workspaces, not in skiff's working
    /// directory, so every path handed to them (`$SKIFF_OUTPUT`, `$SKIFF_WORKSPACE`) must not
    /// depend on the current directory.
    pub async fn open(&self) -> anyhow::Result<Data> {
        use anyhow::Context;
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("creating {}", self.data.display()))?;
        let dir = std::path::absolute(&self.data)
            .with_context(|| format!("resolving {}", self.data.display()))?;
        make_private(&dir).with_context(|| format!("securing {}", dir.display()))?;
        let store = skiff_core::store::SqliteStore::open(&dir.join(DB_FILE))
            .await
            .context("opening the store")?;
        Ok(Data { dir, store })
    }

    /// Whether the data folder holds a Store already.
    pub fn exists(&self) -> bool {
        self.data.join(DB_FILE).exists()
    }
}

/// The data folder only its owner can enter (0700), its files only its owner can read (0600):
/// it holds the credentials' hashes and every run's log.
fn make_private(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let mode = if meta.is_dir() { 0o700 } else { 0o600 };
        if meta.is_dir() || meta.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// A credential from the environment variable `var` or from a file only its owner can read (mode
/// 600, its last line break not part of it), not both: the value and where it came from; `None`
/// when neither is given. `flag` names the file's flag in messages.
pub fn credential(
    file: Option<&std::path::Path>,
    var: &str,
    flag: &str,
    what: &str,
) -> anyhow::Result<Option<(String, String)>> {
    use anyhow::Context;
    match (file, std::env::var(var)) {
        (Some(_), Ok(_)) => anyhow::bail!("give {what} in {var} or in {flag}, not both"),
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
            Ok(Some((
                text.trim_end_matches(['\n', '\r']).to_string(),
                path.display().to_string(),
            )))
        }
        (None, Ok(value)) => Ok(Some((value, var.to_string()))),
        (None, Err(std::env::VarError::NotPresent)) => Ok(None),
        (None, Err(std::env::VarError::NotUnicode(_))) => anyhow::bail!("{var} is not valid text"),
    }
}

/// The Store's file in the data folder.
const DB_FILE: &str = "skiff.db";

/// The data folder, opened: its absolute path and its Store.
pub struct Data {
    pub dir: PathBuf,
    pub store: skiff_core::store::SqliteStore,
}

impl Data {
    /// Takes the data folder's server lock for as long as the returned file stays open: one
    /// `skiff serve` per data folder. Whoever holds it knows that runs claimed by an earlier
    /// server on the folder have no live worker.
    pub fn lock_for_serve(&self) -> anyhow::Result<std::fs::File> {
        use anyhow::Context;
        let path = self.dir.join("serve.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another `skiff serve` is running on the data folder {}",
                self.dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

/// The file in the data folder that holds the URL of the server last started on it.
const SERVER_URL_FILE: &str = "server-url";

/// Records where the server on this data folder is reached, for `skiff login-link`.
pub fn write_server_url(data: &std::path::Path, url: &str) {
    if let Err(e) = std::fs::write(data.join(SERVER_URL_FILE), format!("{url}\n")) {
        tracing::warn!(error = %e, "recording the server's URL in the data folder failed");
    }
}

/// The URL of the server last started on the data folder, if any.
pub fn read_server_url(data: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(data.join(SERVER_URL_FILE)).ok()?;
    let url = text.trim();
    (url.starts_with("http://") || url.starts_with("https://")).then(|| url.to_string())
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

/// Gives back the pages of this binary's code that starting up touched: skiff's code is 25 MB,
/// and the kernel maps each page it runs with its neighbours (16 at a time, from the page
/// cache), so a server or worker that has started and now waits held 12.5 MB of its binary's
/// pages (measured, with 2 MB of its own memory), most of them never run again. The pages stay
/// in the page cache; those that run again are mapped again.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn drop_start_up_code() {
    let (Ok(maps), Ok(exe)) = (
        std::fs::read_to_string("/proc/self/maps"),
        std::fs::read_link("/proc/self/exe"),
    ) else {
        return;
    };
    let Some(exe) = exe.to_str() else { return };
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(path)) = (fields.next(), fields.next(), fields.nth(3))
        else {
            continue;
        };
        // The code: never written, so dropping its pages loses nothing.
        if path != exe || !perms.starts_with("r-x") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: madvise only gives the kernel advice about a read-only mapping of this
        // process's own executable (as /proc/self/maps lists it): MADV_PAGEOUT unmaps its clean
        // pages, which are mapped again from the file when next run; no contents change, and a
        // refusal leaves things as they were.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end.saturating_sub(start),
                libc::MADV_PAGEOUT,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn drop_start_up_code() {}

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
        Command::Worker(args) => worker::main(args),
        Command::Trigger(args) => trigger::main(args),
        Command::LoginLink(args) => login_link::main(args),
        Command::Token(args) => login_link::token(args),
        Command::Reap(args) => reap::main(args),
        Command::StepInit(args) => {
            let code = skiff_worker::isolation::step_init(
                &args.hide,
                args.private.as_deref(),
                &args.keep,
                &args.program,
            );
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
