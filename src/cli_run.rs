//! `skiff run`: run a pipeline here, with live output in the terminal, recorded in the data folder.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use skiff_core::catalog::Entry;
use skiff_core::diag::Report;
use skiff_core::dispatch::DispatchError;
use skiff_core::duration::human;
use skiff_core::pipeline::Phase;
use skiff_core::run::{RunStatus, StepRecord, StepStatus, Trigger, TriggerKind};
use skiff_core::store::Store;
use skiff_worker::secrets::Secrets;
use skiff_worker::{RunObserver, RunOptions, execute_run};
use tokio_util::sync::CancellationToken;

use crate::DataArgs;
use skiff_core::catalog::load_file_with;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The pipeline file to run
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// A param for the run, as NAME=VALUE (repeat for more)
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
    #[command(flatten)]
    config: crate::ConfigArgs,
    /// A file of secrets as NAME=value lines, readable by its owner only (mode 600)
    #[arg(long, env = "SKIFF_SECRETS_FILE", value_name = "FILE")]
    secrets: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    lease: crate::LeaseArgs,
    #[command(flatten)]
    isolation: crate::IsolationArgs,
    /// Keep the run's workspace folder after it ends (it is removed by default)
    #[arg(long)]
    keep_workspace: bool,
    /// Time a stopped step gets between SIGTERM and SIGKILL
    #[arg(long, env = "SKIFF_KILL_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    kill_grace: Duration,
    /// Colour the output: auto (when stdout is a terminal and NO_COLOR is unset), always, never
    #[arg(long, default_value = "auto", value_name = "WHEN")]
    color: ColorChoice,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

pub fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    skiff_core::duration::parse(s)
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(run(args))
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Not dumpable (its environment and memory out of reach of its uid's other processes);
    // what it creates, private.
    skiff_worker::isolation::harden_this_process();
    let config = args.config.read()?;
    let (source, loaded) = load_file_with(&args.file, &config.load_options());
    let shown = args.file.display().to_string();
    let pipeline = match loaded {
        Ok(p) => p,
        Err(diags) => {
            eprint!(
                "{}",
                Report {
                    file: &shown,
                    source: &source,
                    diagnostics: &diags
                }
            );
            bail!(
                "{shown} is not a valid pipeline ({})",
                skiff_core::diag::problems(diags.len())
            );
        }
    };
    let mut given = BTreeMap::new();
    for (k, v) in args.params {
        given.insert(k, v);
    }
    let actor = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    let pipeline = Arc::new(pipeline);
    let entry = Entry {
        name: pipeline.name.clone(),
        file: args.file.clone(),
        source,
        pipeline: Some(pipeline.clone()),
        diagnostics: Vec::new(),
    };
    // The same rules as every other way in: the pipeline must accept manual runs, the params
    // must fit.
    let trigger = Trigger {
        kind: TriggerKind::Cli,
        actor,
    };
    let new = match skiff_core::dispatch::new_run(&entry, &given, trigger) {
        Ok(new) => new,
        Err(DispatchError::Params(errors)) => {
            for e in &errors {
                eprintln!("skiff: param `{}`: {}", e.param, e.message);
            }
            bail!("the params do not fit pipeline `{}`", pipeline.name);
        }
        Err(e) => bail!("{e}"),
    };
    eprintln!("skiff: {}", skiff_worker::process_tracking()?.description());
    let secrets = Secrets::load(std::env::vars(), args.secrets.as_deref())?;
    let tools = crate::tools(config, &secrets)?;
    let data = args.data.open().await?;
    let (workspaces, isolation) = args.isolation.resolve(&data)?;
    let store: Arc<dyn Store> = Arc::new(data.store.clone());
    let run = store.create_run(new).await?.run;
    // Claimed like any worker's run: its lease is renewed while it runs, so a `skiff serve` on
    // the same data folder leaves it alone (and finishes it if this process dies).
    let (run, claim) = store
        .claim_run(
            &run.id,
            &format!("cli:{}", std::process::id()),
            args.lease.lease,
        )
        .await?;

    let color = match args.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    };
    let term = Arc::new(Terminal::new(color));
    term.header(&format!("{} #{}", run.pipeline, run.number), &run.params);

    let cancel = CancellationToken::new();
    let abort = CancellationToken::new();
    tokio::spawn(watch_signals(cancel.clone(), abort.clone(), term.clone()));
    let opts = RunOptions {
        workspace_root: workspaces,
        isolation,
        allow_docker_steps: args.isolation.allow_docker_steps,
        keep_workspace: args.keep_workspace,
        // One run: nothing would reuse its folders.
        spares: std::sync::Arc::new(skiff_worker::isolation::SpareDirs::keeping(0)),
        tools,
        kill_grace: args.kill_grace,
        secrets,
        cancel,
        abort,
        cancel_reason: "cancelled by Ctrl-C or SIGTERM".into(),
        abort_reason: "cancelled, and its finally steps stopped by a second Ctrl-C or SIGTERM"
            .into(),
        lease: args.lease.lease,
        store_patience: skiff_worker::runner::DEFAULT_STORE_PATIENCE,
        end_behind: None,
    };
    let started = std::time::Instant::now();
    let outcome = execute_run(store.clone(), &run, claim, &pipeline, &opts, term.clone()).await?;
    term.footer(
        &format!("{} #{}", run.pipeline, run.number),
        outcome.status,
        outcome.reason.as_deref(),
        started.elapsed(),
    );
    skiff_worker::release_cgroups();
    eprintln!("run {} recorded in {}", run.id, data.dir.display());
    Ok(if outcome.status == RunStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// First Ctrl-C (or SIGTERM) cancels the run, which still runs `finally`; a second one stops
/// `finally` too.
async fn watch_signals(cancel: CancellationToken, abort: CancellationToken, term: Arc<Terminal>) {
    let Ok(mut term_signal) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    for round in 0..2 {
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { return },
            _ = term_signal.recv() => {}
        }
        if round == 0 {
            term.note("cancelling: stopping the current step, then running finally steps (again to stop those too)");
            cancel.cancel();
        } else {
            term.note("stopping finally steps");
            abort.cancel();
        }
    }
}

/// Prints a run to the terminal: step headers, log lines, results.
struct Terminal {
    color: bool,
    out: Mutex<std::io::BufWriter<std::io::Stdout>>,
}

const RESET: &str = "\x1b[0m";

impl Terminal {
    fn new(color: bool) -> Self {
        Terminal {
            color,
            out: Mutex::new(std::io::BufWriter::with_capacity(
                64 << 10,
                std::io::stdout(),
            )),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    fn write(&self, text: &str) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }

    fn header(&self, title: &str, params: &BTreeMap<String, String>) {
        let mut s = format!("{} {}\n", self.paint("1;36", "▶"), self.paint("1", title));
        if !params.is_empty() {
            let list: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!(
                "  {}\n",
                self.paint("2", &format!("params: {}", list.join(" ")))
            ));
        }
        self.write(&s);
    }

    fn note(&self, text: &str) {
        self.write(&format!(
            "{}\n",
            self.paint("33", &format!("skiff: {text}"))
        ));
    }

    fn footer(&self, title: &str, status: RunStatus, reason: Option<&str>, took: Duration) {
        let (symbol, code) = match status {
            RunStatus::Succeeded => ("✓", "1;32"),
            RunStatus::Cancelled => ("⊘", "1;33"),
            RunStatus::TimedOut => ("⏱", "1;35"),
            _ => ("✗", "1;31"),
        };
        let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
        self.write(&format!(
            "{} {title} {status} in {}{why}\n",
            self.paint(code, symbol),
            human(took)
        ));
    }
}

impl RunObserver for Terminal {
    fn log(&self, _step: Option<u32>, data: &[u8]) {
        let prefix: &[u8] = if self.color {
            "  \x1b[2m│\x1b[0m ".as_bytes()
        } else {
            "  │ ".as_bytes()
        };
        // Build the whole block first: one write per chunk, not two per line.
        let mut block = Vec::with_capacity(data.len() + data.len() / 8 + prefix.len());
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data)
            .map(|i| i + 1)
            .chain((!data.is_empty() && !data.ends_with(b"\n")).then_some(data.len()))
        {
            let line = &data[start..end];
            start = end;
            block.extend_from_slice(prefix);
            if self.color && line.starts_with(b"[skiff] ") {
                block.extend_from_slice(b"\x1b[33m");
                block.extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
                block.extend_from_slice(b"\x1b[0m\n");
            } else {
                block.extend_from_slice(line);
            }
        }
        let Ok(mut out) = self.out.lock() else { return };
        let _ = out.write_all(&block);
        let _ = out.flush();
    }

    fn step_changed(&self, step: &StepRecord) {
        let took = match (step.started_at, step.finished_at) {
            (Some(a), Some(b)) => human((b - a).to_std().unwrap_or_default()),
            _ => String::new(),
        };
        let why = step
            .reason
            .as_deref()
            .map(|r| format!(" — {r}"))
            .unwrap_or_default();
        let line = match step.status {
            StepStatus::Running if step.attempt == 1 => {
                let tag = if step.phase == Phase::Finally {
                    self.paint("2", " (finally)")
                } else {
                    String::new()
                };
                format!(
                    "{} {}{tag}\n",
                    self.paint("36", "●"),
                    self.paint("1", &step.name)
                )
            }
            StepStatus::Running | StepStatus::Pending => return,
            StepStatus::Succeeded => format!(
                "{} {} {}\n",
                self.paint("32", "✓"),
                step.name,
                self.paint("2", &took)
            ),
            StepStatus::Failed => format!(
                "{} {}{why} {}\n",
                self.paint("31", "✗"),
                step.name,
                self.paint("2", &took)
            ),
            StepStatus::TimedOut => format!(
                "{} {}{why} {}\n",
                self.paint("35", "⏱"),
                step.name,
                self.paint("2", &took)
            ),
            StepStatus::Cancelled => format!("{} {}{why}\n", self.paint("33", "⊘"), step.name),
            StepStatus::Skipped => format!(
                "{} {}{}\n",
                self.paint("2", "○"),
                self.paint("2", &step.name),
                self.paint("2", &format!(" skipped{why}"))
            ),
        };
        self.write(&line);
    }
}
