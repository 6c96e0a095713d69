//! Running one process tree for a step: its own process group inside its run's cgroup (see
//! `cgroup.rs`), output captured through one pipe, and an end that takes the whole tree with it:
//! SIGTERM to the group, a grace period, SIGKILL to the group, then the cgroup killed whole, which
//! also ends what left the group (`setsid`).

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cgroup::{self, Cgroup, RunCgroup};
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
    pub tracker: &'a RunTracker,
    /// Who to run as (isolated runs); `None`: skiff's own.
    pub user: Option<crate::isolation::Creds>,
}

/// Where a run's step processes are tracked: the run's cgroup, taken at its first step, killed
/// whole at the end of every step, and given back to the pool when this is dropped (at the run's
/// end). Without one (`env` mode), only the marker `SKIFF_RUN_ID` every step's processes carry.
pub struct RunTracker {
    run_id: String,
    cgroup: std::sync::Mutex<Option<std::sync::Arc<RunCgroup>>>,
}

impl RunTracker {
    pub fn new(run_id: &str) -> Self {
        RunTracker {
            run_id: run_id.to_string(),
            cgroup: std::sync::Mutex::new(None),
        }
    }

    /// The run's cgroup for its next step (taken when first needed, and again after one that
    /// cannot be reused).
    fn cgroup(&self) -> Option<std::sync::Arc<RunCgroup>> {
        let mut current = match self.cgroup.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.as_ref().is_some_and(|c| !c.reusable()) {
            *current = None;
        }
        if current.is_none() {
            *current = cgroup::for_run(&self.run_id).map(std::sync::Arc::new);
        }
        current.clone()
    }
}

/// After skiff died during a run: ends what the run left behind, by its cgroup, then by its
/// marker (for a process that left the cgroup, or a run tracked without one). Returns whether any
/// process was ended.
pub fn end_interrupted(run_id: &str) -> bool {
    let by_cgroup = cgroup::end_leftovers();
    reap_orphans(run_id) || by_cgroup
}

/// Ends what a dead skiff left running for a run: every process whose environment carries
/// `SKIFF_RUN_ID=<run id>` (every step's processes do, and their children inherit it), with its
/// process group. A reused process id is never hit: the marker is checked on the process itself.
/// Returns whether any process was ended.
pub fn reap_orphans(run_id: &str) -> bool {
    let marker = format!("SKIFF_RUN_ID={run_id}");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    let own_group = nix::unistd::getpgrp();
    let mut ended = false;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|&p| p > 1)
        else {
            continue;
        };
        let ours = std::fs::read(entry.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()));
        if !ours {
            continue;
        }
        let pid = Pid::from_raw(pid);
        if let Ok(group) = nix::unistd::getpgid(Some(pid))
            && group.as_raw() > 1
            && group != own_group
        {
            signal_group(group, Signal::SIGKILL);
        }
        // One that left its group (`setsid`) is ended on its own.
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        ended = true;
    }
    ended
}

/// How long to wait for output still buffered in the pipe after the step's processes are gone.
/// Without a cgroup, a process that left the group (`setsid`) can hold the pipe open longer.
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
    let cgroup = spec.tracker.cgroup();
    let cgroup: Option<&Cgroup> = cgroup.as_deref().map(|c| &**c);
    let mut child = match cgroup
        .and_then(|c| c.dir_fd())
        .filter(|_| crate::spawn::available())
    {
        // Created inside the run's cgroup v2 (see `spawn.rs`).
        Some(dir) => StepChild::Cloned(crate::spawn::spawn(crate::spawn::Start {
            program: spec.program,
            args: spec.args,
            env: spec.env,
            cwd: spec.cwd,
            stdout: out,
            stderr: err,
            cgroup: dir,
            user: spec.user,
        })?),
        None => {
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
            if let Some(cgroup) = cgroup {
                cgroup.place(&mut cmd);
            }
            let user = spec.user;
            // SAFETY: only async-signal-safe system calls on this child's own credentials,
            // descriptors and mask. Registered after the cgroup placement, which needs skiff's
            // own powers.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(c) = user
                        && (libc::setgroups(
                            usize::from(c.extra_group.is_some()),
                            c.extra_group.as_ref().map_or(std::ptr::null(), |g| g),
                        ) != 0
                            || libc::setresgid(c.gid, c.gid, c.gid) != 0
                            || libc::setresuid(c.uid, c.uid, c.uid) != 0)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Only fds 0-2 reach the step, whatever skiff inherited (close-on-exec:
                    // the spawn's own error pipe must stay open until the exec); steps get the
                    // usual umask, not skiff's private one.
                    libc::syscall(
                        libc::SYS_close_range,
                        3u32,
                        u32::MAX,
                        libc::CLOSE_RANGE_CLOEXEC,
                    );
                    libc::umask(0o022);
                    Ok(())
                });
            }
            let child = cmd.spawn()?;
            // Close this process's copies of the pipe's write end, so the reader sees the end
            // of the output once the step's processes are gone.
            drop(cmd);
            StepChild::Command(child)
        }
    };
    let pgid = child.pid();

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
    // Whatever the step left running in its group (`sleep 1000 &`) ends with it, and with a
    // cgroup, whatever left the group too.
    if pgid.as_raw() > 0 {
        signal_group(pgid, Signal::SIGKILL);
    }
    if let Some(cgroup) = cgroup
        && let Err(e) = cgroup.end_all().await
    {
        log.note(
            Some(step),
            &format!("ending the step's leftover processes failed: {e}"),
        )
        .await;
    }
    match tokio::time::timeout(DRAIN_WAIT, &mut reader_task).await {
        Ok(_) => {}
        Err(_) => {
            reader_task.abort();
            log.note(Some(step), "a process that left the step's process group still holds its output open; its further output is not captured").await;
        }
    }
    Ok(ended)
}

/// A step's main process, started by `std` (with a cgroup v1 or none) or by `clone3` into a
/// cgroup v2.
enum StepChild {
    Command(tokio::process::Child),
    Cloned(crate::spawn::Child),
}

impl StepChild {
    /// Its pid, which is also its process group's id (0 once it has been reaped).
    fn pid(&self) -> Pid {
        match self {
            StepChild::Command(c) => {
                Pid::from_raw(c.id().and_then(|id| i32::try_from(id).ok()).unwrap_or(0))
            }
            StepChild::Cloned(c) => c.id(),
        }
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            StepChild::Command(c) => c.wait().await,
            StepChild::Cloned(c) => c.wait().await,
        }
    }

    async fn kill(&mut self) {
        match self {
            StepChild::Command(c) => {
                let _ = c.kill().await;
            }
            StepChild::Cloned(c) => {
                c.kill();
                let _ = c.wait().await;
            }
        }
    }
}

/// SIGTERM to the group, up to `grace` for the leader to exit, then SIGKILL.
async fn terminate(child: &mut StepChild, pgid: Pid, grace: Duration) {
    if pgid.as_raw() <= 0 {
        child.kill().await;
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
