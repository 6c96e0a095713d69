//! Running one process tree for a step: its own process group, output captured through one pipe,
//! and an end that takes the whole group with it (SIGTERM, a grace period, then SIGKILL).

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::logs::{LineSplitter, LogSender, Masker};

/// How a process ended.
#[derive(Debug)]
pub enum Ended {
    Exited(ExitStatus),
    /// Its deadline passed and it was killed.
    DeadlineReached,
    /// The stop token fired and it was killed.
    Stopped,
}

pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: &'a [&'a std::ffi::OsStr],
    pub cwd: &'a Path,
    pub env: &'a [(String, String)],
    /// Where to note the process group while it runs, so that a later skiff can end the tree
    /// if this one dies without doing it (see `reap_orphans`).
    pub group_file: &'a Path,
}

/// Ends what a dead skiff left running for a run: the process group noted in `group_file`, but
/// only if that group still belongs to the run (its leader carries `SKIFF_RUN_ID=<run id>` in its
/// environment), so a reused process id is never hit. Returns whether a group was ended.
pub fn reap_orphans(group_file: &Path, run_id: &str) -> bool {
    let Some(pgid) = std::fs::read_to_string(group_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return false;
    };
    if pgid <= 1 {
        return false;
    }
    let marker = format!("SKIFF_RUN_ID={run_id}");
    let ours = std::fs::read(format!("/proc/{pgid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()));
    if ours {
        signal_group(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    ours
}

/// How long to wait for output still buffered in the pipe after the process group is gone.
/// Only a process that left the group (`setsid`) can hold the pipe open longer.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
const READ_BUF: usize = 64 << 10;
/// Output is passed on in chunks of about this size (or less, when no more is ready).
const CHUNK_BYTES: usize = 256 << 10;
/// The pipe's kernel buffer: a step that prints fast blocks less often.
const PIPE_BYTES: i32 = 1 << 20;

fn signal_group(pgid: Pid, signal: Signal) {
    // ESRCH (no such group) means everything is already gone.
    let _ = killpg(pgid, signal);
}

/// Runs the process to its end, sending its masked output to `log` as `step`'s.
pub async fn run(
    spec: Spawn<'_>,
    log: &LogSender,
    step: u32,
    masker: &Masker,
    deadline: Option<Instant>,
    stop: &CancellationToken,
    grace: Duration,
) -> std::io::Result<Ended> {
    let (writer, reader) = tokio::net::unix::pipe::pipe()?;
    // A bigger buffer is an optimisation; the default (64 KiB) works too.
    let _ = nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
    let out = writer.into_blocking_fd()?;
    let err = out.try_clone()?;
    let mut cmd = tokio::process::Command::new(spec.program);
    cmd.args(spec.args)
        .current_dir(spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    // Close this process's copies of the pipe's write end, so the reader sees the end of the
    // output once the step's processes are gone.
    drop(cmd);
    let pgid = Pid::from_raw(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or(0),
    );
    // Best effort: without the note, only a crash of skiff itself would leave the tree behind.
    let _ = std::fs::write(spec.group_file, pgid.as_raw().to_string());

    let mut reader_task = tokio::spawn(read_output(reader, log.clone(), step, masker.clone()));

    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status?),
        () = sleep => {
            terminate(&mut child, pgid, grace).await;
            Ended::DeadlineReached
        }
        () = stop.cancelled() => {
            terminate(&mut child, pgid, grace).await;
            Ended::Stopped
        }
    };
    // Whatever the step left running in its group (`sleep 1000 &`) ends with it.
    if pgid.as_raw() > 0 {
        signal_group(pgid, Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(spec.group_file);
    match tokio::time::timeout(DRAIN_WAIT, &mut reader_task).await {
        Ok(_) => {}
        Err(_) => {
            reader_task.abort();
            log.note(Some(step), "a process that left the step's process group still holds its output open; its further output is not captured").await;
        }
    }
    Ok(ended)
}

/// SIGTERM to the group, up to `grace` for the leader to exit, then SIGKILL.
async fn terminate(child: &mut tokio::process::Child, pgid: Pid, grace: Duration) {
    if pgid.as_raw() <= 0 {
        let _ = child.kill().await;
        return;
    }
    signal_group(pgid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

async fn read_output(
    reader: tokio::net::unix::pipe::Receiver,
    log: LogSender,
    step: u32,
    masker: Masker,
) {
    let mut splitter = LineSplitter::new(masker);
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::with_capacity(CHUNK_BYTES + READ_BUF);
    loop {
        // Wait for output, then take all that is ready (up to a chunk) before passing it on:
        // a producer writing 4 KiB at a time then costs one log chunk per 256 KiB, not per write.
        if let Err(e) = reader.readable().await {
            tracing::warn!(error = %e, "waiting for step output failed");
            break;
        }
        let mut ended = false;
        while out.len() < CHUNK_BYTES {
            match reader.try_read(&mut buf) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => splitter.push(&buf[..n], &mut out),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading step output failed");
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            break;
        }
        if !out.is_empty() {
            log.send(
                Some(step),
                std::mem::replace(&mut out, Vec::with_capacity(CHUNK_BYTES + READ_BUF)),
            )
            .await;
        }
    }
    splitter.finish(&mut out);
    log.send(Some(step), out).await;
}
