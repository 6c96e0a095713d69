//! Tracking a run's processes by cgroup, so that everything a step started ends with the step,
//! including processes that left its process group (`setsid`) and dropped `SKIFF_RUN_ID`.
//!
//! How, is decided once per skiff process ([`tracking`]): a cgroup v2 hierarchy where skiff can
//! make a child cgroup with `cgroup.kill` and put a process in it; else a writable cgroup v1
//! freezer hierarchy; else the environment marker alone (`SKIFF_RUN_ID`, see `process.rs`).
//! `SKIFF_PROCESS_TRACKING=auto|cgroup2|freezer|env` overrides the choice; a mode that is asked
//! for and unavailable is an error at start.
//!
//! Each running run has a cgroup of its own under `<skiff's own cgroup>/skiff/`, taken from a
//! pool of this process's cgroups (named `<pid>-<n>`) at its first step and given back, emptied,
//! when the run ends: moving the first process into a new cgroup costs the kernel an RCU grace
//! period (10 to 20 ms), into one used before 0.4 ms. Steps run one after another, so at a step's
//! end the run's cgroup holds exactly what that step left; it is killed whole (v2: `cgroup.kill`,
//! one write; v1: freeze, SIGKILL every member, thaw, wait). A step's processes are moved into
//! it between fork and exec, so nothing they start is ever outside it.
//!
//! Each cgroup is held with an exclusive `flock` on its directory while its process lives. At
//! start, skiff removes the empty cgroups under `skiff/` that nobody holds (left by a skiff that
//! was killed); when a run is taken over from a dead worker, every cgroup nobody holds is killed
//! and removed ([`end_leftovers`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The environment variable that overrides how steps are tracked.
pub const TRACKING_VAR: &str = "SKIFF_PROCESS_TRACKING";

/// How long killing a cgroup may take before skiff gives up on it (a process in uninterruptible
/// sleep cannot die until its I/O ends).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How a step's processes are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A cgroup v2 cgroup per run, killed with `cgroup.kill`.
    Cgroup2,
    /// A cgroup v1 freezer cgroup per run: freeze, SIGKILL each member, thaw.
    Freezer,
    /// No cgroup: the step's process group, and the `SKIFF_RUN_ID` marker in each process's
    /// environment.
    Env,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cgroup2 => "cgroup2",
            Mode::Freezer => "freezer",
            Mode::Env => "env",
        }
    }
}

/// The tracking this skiff process uses.
#[derive(Debug)]
pub struct Tracking {
    mode: Mode,
    /// `<skiff's own cgroup>/skiff`, where each run's cgroup is made; none in `env` mode.
    base: Option<PathBuf>,
    description: String,
}

impl Tracking {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One line for the start of `skiff serve` and `skiff run`, naming the mode.
    pub fn description(&self) -> &str {
        &self.description
    }
}

/// A mode was asked for (`SKIFF_PROCESS_TRACKING`) that is unknown or unavailable here.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TrackingError(String);

/// How steps are tracked, decided at the first call (which also removes the empty cgroups that
/// killed skiffs left behind).
pub fn tracking() -> Result<&'static Tracking, TrackingError> {
    static DETECTED: OnceLock<Result<Tracking, TrackingError>> = OnceLock::new();
    DETECTED
        .get_or_init(|| detect(std::env::var(TRACKING_VAR).ok().as_deref()))
        .as_ref()
        .map_err(Clone::clone)
}

fn detect(wanted: Option<&str>) -> Result<Tracking, TrackingError> {
    let wanted = match wanted.map(str::trim) {
        None | Some("" | "auto") => None,
        Some("cgroup2") => Some(Mode::Cgroup2),
        Some("freezer") => Some(Mode::Freezer),
        Some("env") => Some(Mode::Env),
        Some(other) => {
            return Err(TrackingError(format!(
                "{TRACKING_VAR} must be auto, cgroup2, freezer or env, not `{other}`"
            )));
        }
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut why_not = Vec::new();
    for mode in [Mode::Cgroup2, Mode::Freezer] {
        if wanted.is_some_and(|w| w != mode) {
            continue;
        }
        match usable_base(mode, &own, &mounts) {
            Ok(base) => {
                remove_leftovers(&base);
                let description = match mode {
                    Mode::Cgroup2 => format!(
                        "steps are tracked by cgroup v2 at {} (cgroup.kill)",
                        base.display()
                    ),
                    _ => format!(
                        "steps are tracked by the cgroup v1 freezer at {} (freeze, kill, thaw)",
                        base.display()
                    ),
                };
                return Ok(Tracking {
                    mode,
                    base: Some(base),
                    description,
                });
            }
            Err(e) if wanted == Some(mode) => {
                return Err(TrackingError(format!(
                    "{TRACKING_VAR}={}, but {} cannot be used here: {e}",
                    mode.as_str(),
                    label(mode)
                )));
            }
            Err(e) => why_not.push(format!("{}: {e}", label(mode))),
        }
    }
    let why = if wanted == Some(Mode::Env) {
        format!("{TRACKING_VAR}=env")
    } else {
        format!("no usable cgroup: {}", why_not.join("; "))
    };
    Ok(Tracking {
        mode: Mode::Env,
        base: None,
        description: format!(
            "steps are tracked by process group and the SKIFF_RUN_ID marker ({why}); \
             a process that leaves its step's process group and unsets SKIFF_RUN_ID outlives its step"
        ),
    })
}

fn label(mode: Mode) -> &'static str {
    match mode {
        Mode::Cgroup2 => "cgroup v2",
        Mode::Freezer => "the cgroup v1 freezer",
        Mode::Env => "the environment marker",
    }
}

/// A mounted cgroup hierarchy, from `/proc/self/mountinfo`.
struct Mount {
    /// The cgroup at the root of this mount (a path in the cgroup namespace).
    root: String,
    point: PathBuf,
}

/// The mounts of `mode`'s hierarchy.
fn hierarchy_mounts(mode: Mode, mountinfo: &str) -> Vec<Mount> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        // `id parent major:minor root mount-point options [optional...] - fstype source super-options`
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        let mut mount = mount.split(' ');
        let (Some(root), Some(point)) = (mount.nth(3), mount.next()) else {
            continue;
        };
        let mut fs = fs.split(' ');
        let (fstype, super_opts) = (fs.next().unwrap_or(""), fs.nth(1).unwrap_or(""));
        let ours = match mode {
            Mode::Cgroup2 => fstype == "cgroup2",
            Mode::Freezer => fstype == "cgroup" && super_opts.split(',').any(|o| o == "freezer"),
            Mode::Env => false,
        };
        if ours {
            found.push(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
            });
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// skiff's own cgroup in `mode`'s hierarchy, from `/proc/self/cgroup`.
fn own_cgroup(mode: Mode, proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        // `hierarchy-id:controllers:path`; the path may itself hold ':'.
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = match mode {
            Mode::Cgroup2 => id == "0" && controllers.is_empty(),
            Mode::Freezer => controllers.split(',').any(|c| c == "freezer"),
            Mode::Env => false,
        };
        ours.then(|| path.to_string())
    })
}

/// Where skiff's own cgroup `own` is in `mount`, if the mount holds it.
fn dir_in(mount: &Mount, own: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        own
    } else {
        let rest = own.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    Some(mount.point.join(rel.trim_start_matches('/')))
}

/// `<own cgroup>/skiff` in `mode`'s hierarchy, once a child cgroup made there has proved usable.
fn usable_base(mode: Mode, proc_self_cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let own = own_cgroup(mode, proc_self_cgroup)
        .ok_or_else(|| "skiff's own cgroup is not listed in /proc/self/cgroup".to_string())?;
    let mounts = hierarchy_mounts(mode, mountinfo);
    if mounts.is_empty() {
        return Err(match mode {
            Mode::Cgroup2 => "no cgroup2 file system is mounted".into(),
            _ => "no freezer hierarchy is mounted".into(),
        });
    }
    let mut problems = Vec::new();
    for mount in &mounts {
        let Some(own_dir) = dir_in(mount, &own) else {
            continue;
        };
        if !own_dir.is_dir() {
            continue;
        }
        let base = own_dir.join("skiff");
        match probe(&base, mode) {
            Ok(()) => return Ok(base),
            Err(e) => problems.push(format!("{}: {e}", base.display())),
        }
    }
    if problems.is_empty() {
        let points: Vec<String> = mounts
            .iter()
            .map(|m| m.point.display().to_string())
            .collect();
        return Err(format!(
            "skiff's own cgroup {own} is not under the mounts at {}",
            points.join(", ")
        ));
    }
    Err(problems.join("; "))
}

/// Makes a child cgroup under `base` and puts a short-lived process in it.
fn probe(base: &Path, mode: Mode) -> Result<(), String> {
    match std::fs::create_dir(base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot make it: {e}")),
    }
    let probe = Cgroup::create(base.join(format!("probe-{}", std::process::id())), mode)
        .map_err(|e| format!("cannot make a cgroup in it: {e}"))?;
    let needed = match mode {
        Mode::Cgroup2 => "cgroup.kill",
        _ => "freezer.state",
    };
    if !probe.dir.join(needed).exists() {
        return Err(match mode {
            Mode::Cgroup2 => "its cgroups have no cgroup.kill (it came with Linux 5.14)".into(),
            _ => format!("its cgroups have no {needed}"),
        });
    }
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", ":"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    place(&mut cmd, &probe.procs);
    let started = cmd
        .spawn()
        .and_then(|mut c| c.wait())
        .map_err(|e| format!("cannot move a process into a cgroup there: {e}"));
    drop(probe);
    started.map(|_| ())
}

/// A cgroup skiff made (a run's, or the probe), held with an exclusive `flock` on its directory
/// so that another skiff's clean-up leaves it alone. Dropping it kills what is left in it and
/// removes it.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    mode: Mode,
    /// `cgroup.procs`, opened for writing: a step's process writes "0" to it before exec.
    procs: Arc<File>,
    /// The lock on the directory, until the cgroup is removed.
    held: Option<Flock<File>>,
    /// `cgroup.kill` was written to it. A process later created in it with `clone3` may be
    /// killed at birth as though the kill were still under way (seen with Linux 6.18), so it
    /// is not used again.
    killed: std::sync::atomic::AtomicBool,
}

/// Cgroups this process made whose run has ended, emptied, kept for the next runs. Moving the
/// first process into a new cgroup costs the kernel an RCU grace period (10 to 20 ms here, on the
/// way from a trigger to its first step); moving one into a cgroup used before costs 0.4 ms.
static POOL: std::sync::Mutex<Vec<Cgroup>> = std::sync::Mutex::new(Vec::new());
static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn pool() -> std::sync::MutexGuard<'static, Vec<Cgroup>> {
    match POOL.lock() {
        Ok(p) => p,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A run's cgroup while the run lives: taken from the pool (or made), given back emptied when
/// the run ends (dropped).
#[derive(Debug)]
pub struct RunCgroup(Option<Cgroup>);

impl std::ops::Deref for RunCgroup {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        // Only `drop` takes it out.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("a run's cgroup is there until dropped"))
    }
}

impl Drop for RunCgroup {
    /// Kills what is left in it and gives it back to the pool, on a blocking thread when there
    /// is a runtime (an async worker must not wait for processes to die); an empty one goes
    /// back at once.
    fn drop(&mut self) {
        let Some(cgroup) = self.0.take() else {
            return;
        };
        // The common case, an empty cgroup, costs one read: it goes back to the pool at once.
        if cgroup.reusable() && !populated(&cgroup.dir, cgroup.mode) {
            pool().push(cgroup);
            return;
        }
        let give_back = move || match kill_all(&cgroup.dir, cgroup.mode) {
            Ok(killed) => {
                cgroup.note_kill(killed);
                if cgroup.reusable() {
                    pool().push(cgroup);
                }
            }
            Err(e) => {
                // Not reused; dropping it tries once more and removes it.
                tracing::warn!(cgroup = %cgroup.dir.display(), error = %e, "ending a cgroup's processes failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(give_back);
            }
            Err(_) => give_back(),
        }
    }
}

/// Removes the cgroups kept for reuse (at the end of `skiff run` and `skiff serve`).
pub fn release_pool() {
    let kept = std::mem::take(&mut *pool());
    drop(kept);
}

/// A cgroup for a run, or `None` in `env` mode or when none can be made (then the run is
/// tracked by its marker, with a warning).
pub fn for_run(run_id: &str) -> Option<RunCgroup> {
    let tracking = tracking().ok()?;
    let base = tracking.base.as_ref()?;
    if let Some(kept) = pool().pop() {
        return Some(RunCgroup(Some(kept)));
    }
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{}-{n}", std::process::id());
    match Cgroup::create(base.join(name), tracking.mode) {
        Ok(cgroup) => Some(RunCgroup(Some(cgroup))),
        Err(e) => {
            tracing::warn!(run_id, error = %e, "making the run's cgroup failed; its steps are tracked by their marker");
            None
        }
    }
}

impl Cgroup {
    fn create(dir: PathBuf, mode: Mode) -> std::io::Result<Cgroup> {
        // Another skiff's start-up clean-up may remove the directory between its creation and the
        // lock (it is empty and not yet held): then make it again.
        for _ in 0..10 {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let Ok(handle) = File::open(&dir) else {
                continue;
            };
            let held = match Flock::lock(handle, FlockArg::LockExclusiveNonblock) {
                Ok(held) => held,
                Err((_, Errno::EWOULDBLOCK)) => {
                    // Held by a clean-up that is about to remove it.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err((_, e)) => return Err(e.into()),
            };
            match OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
            {
                Ok(procs) => {
                    return Ok(Cgroup {
                        dir,
                        mode,
                        procs: Arc::new(procs),
                        held: Some(held),
                        killed: std::sync::atomic::AtomicBool::new(false),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(
            "it was removed again and again by another skiff's clean-up",
        ))
    }

    /// The cgroup's directory, open, for `clone3` with `CLONE_INTO_CGROUP` (cgroup v2).
    pub fn dir_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        (self.mode == Mode::Cgroup2)
            .then_some(self.held.as_ref())
            .flatten()
            .map(|held| held.as_fd())
    }

    fn note_kill(&self, killed: bool) {
        if killed && self.mode == Mode::Cgroup2 {
            self.killed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether another step may start in it (see `killed`).
    pub fn reusable(&self) -> bool {
        !self.killed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes `cmd`'s process join this cgroup before it runs anything.
    pub fn place(&self, cmd: &mut tokio::process::Command) {
        place(cmd.as_std_mut(), &self.procs);
    }

    /// Kills every process in the cgroup (and the cgroups below it) and waits until they are
    /// gone (the next step starts in the same cgroup: one started while a kill is under way is
    /// killed too). Returns whether there were any. The common case, an empty cgroup, costs one
    /// read.
    pub async fn end_all(&self) -> std::io::Result<bool> {
        if !populated(&self.dir, self.mode) {
            return Ok(false);
        }
        let (dir, mode) = (self.dir.clone(), self.mode);
        let killed = tokio::task::spawn_blocking(move || kill_all(&dir, mode))
            .await
            .map_err(std::io::Error::other)??;
        self.note_kill(killed);
        Ok(killed)
    }
}

impl Drop for Cgroup {
    /// Kills what is left, waits until it is gone and removes the cgroup: on a blocking thread
    /// when there is a runtime (removing a cgroup just left by a process waits for the kernel to
    /// let go of it; an async worker must not wait for that), else here.
    fn drop(&mut self) {
        let (dir, mode, held) = (self.dir.clone(), self.mode, self.held.take());
        let clean_up = move || {
            if let Err(e) = kill_all(&dir, mode) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "ending a cgroup's processes failed");
            }
            if let Err(e) = remove_tree(&dir) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "removing a cgroup failed");
            }
            drop(held);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(clean_up);
            }
            Err(_) => clean_up(),
        }
    }
}

/// Moves the process `cmd` starts into the cgroup whose `cgroup.procs` is `procs`, between fork
/// and exec: writing "0" to `cgroup.procs` moves the writer.
#[allow(unsafe_code)]
fn place(cmd: &mut std::process::Command, procs: &Arc<File>) {
    use std::os::unix::process::CommandExt;
    let procs = Arc::clone(procs);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It makes one write(2) to a descriptor opened before the fork (the
    // `Arc` is only dereferenced: no allocation, no lock) and returns its result; an error
    // (`last_os_error`) allocates nothing either.
    unsafe {
        cmd.pre_exec(move || (&*procs).write(b"0").map(|_| ()));
    }
}

fn populated(dir: &Path, mode: Mode) -> bool {
    match mode {
        Mode::Cgroup2 => std::fs::read_to_string(dir.join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l == "populated 1")),
        _ => !member_pids(dir).is_empty(),
    }
}

/// Every process in `dir` and the cgroups below it (v1 lists each cgroup's own).
fn member_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(member_pids(&entry.path()));
            }
        }
    }
    pids
}

fn kill_all(dir: &Path, mode: Mode) -> std::io::Result<bool> {
    if !populated(dir, mode) {
        return Ok(false);
    }
    let deadline = Instant::now() + KILL_WAIT;
    if mode == Mode::Cgroup2 {
        std::fs::write(dir.join("cgroup.kill"), "1")?;
        return wait_until(deadline, || !populated(dir, mode)).map(|()| true);
    }
    let state = dir.join("freezer.state");
    loop {
        // Frozen, its members can neither fork nor exit: the list read is complete, and no pid
        // in it is reused before the SIGKILL lands.
        std::fs::write(&state, "FROZEN")?;
        // One in uninterruptible sleep keeps the state at FREEZING; kill what there is anyway.
        let _ = wait_until(Instant::now() + Duration::from_secs(1), || {
            std::fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FROZEN")
        });
        for pid in member_pids(dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::fs::write(&state, "THAWED")?;
        // Killed members die once thawed. One that was not frozen in time may have forked
        // meanwhile: then go again.
        match wait_until(Instant::now() + Duration::from_millis(500), || {
            member_pids(dir).is_empty()
        }) {
            Ok(()) => return Ok(true),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
    }
}

/// Polls `done` (from every 50 µs up to every 5 ms) until it holds or `deadline` passes.
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> std::io::Result<()> {
    let mut pause = Duration::from_micros(50);
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "processes were still there after SIGKILL (in uninterruptible sleep?)",
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Removes a cgroup and the cgroups a step made below it (`rmdir` removes a cgroup's files).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Removes the cgroups under `base` that no live skiff holds and no process is in: what a killed
/// skiff left. One with processes in it is left to its run's clean-up ([`end_leftover`]).
fn remove_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let Ok(handle) = File::open(&dir) else {
            continue;
        };
        let Ok(_held) = Flock::lock(handle, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if let Err(e) = remove_tree(&dir) {
            tracing::debug!(cgroup = %dir.display(), error = %e, "a leftover cgroup is not empty; kept");
        }
    }
}

/// After skiff died during a run: kills what is left in every cgroup under skiff's base that no
/// live skiff holds (a dead process's flocks are gone; a live one's, this process's included,
/// are not) and removes them. Returns whether any process was ended.
pub fn end_leftovers() -> bool {
    let Ok(tracking) = tracking() else {
        return false;
    };
    let Some(base) = &tracking.base else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(base) else {
        return false;
    };
    let mut ended = false;
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let Ok(handle) = File::open(&dir) else {
            continue;
        };
        let Ok(_held) = Flock::lock(handle, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        match kill_all(&dir, tracking.mode) {
            Ok(any) => ended |= any,
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "ending a dead skiff's processes failed");
                ended = true;
            }
        }
        if let Err(e) = remove_tree(&dir) {
            tracing::warn!(cgroup = %dir.display(), error = %e, "removing a dead skiff's cgroup failed");
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 41 0:38 /ci /mnt/my\\040cgroups rw shared:5 - cgroup2 cgroup2 rw,nsdelegate
";

    const PROC_SELF_CGROUP: &str = "\
6:freezer:/jobs
8:pids:/
0::/ci/runner:x
";

    #[test]
    fn finds_the_own_cgroup_in_each_mount() {
        let v2 = hierarchy_mounts(Mode::Cgroup2, MOUNTINFO);
        assert_eq!(v2.len(), 2);
        assert_eq!(v2[1].point, PathBuf::from("/mnt/my cgroups"));
        let own = own_cgroup(Mode::Cgroup2, PROC_SELF_CGROUP).expect("v2 line");
        assert_eq!(own, "/ci/runner:x");
        assert_eq!(
            dir_in(&v2[0], &own),
            Some(PathBuf::from("/sys/fs/cgroup/unified/ci/runner:x"))
        );
        assert_eq!(
            dir_in(&v2[1], &own),
            Some(PathBuf::from("/mnt/my cgroups/runner:x"))
        );
        let other = Mount {
            root: "/c".into(),
            point: "/m".into(),
        };
        assert_eq!(dir_in(&other, &own), None, "/ci is not under /c");

        let v1 = hierarchy_mounts(Mode::Freezer, MOUNTINFO);
        assert_eq!(v1.len(), 1);
        let own = own_cgroup(Mode::Freezer, PROC_SELF_CGROUP).expect("freezer line");
        assert_eq!(
            dir_in(&v1[0], &own),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/jobs"))
        );
    }

    #[test]
    fn an_unknown_mode_is_refused() {
        let e = detect(Some("systemd")).expect_err("unknown mode");
        assert!(
            e.to_string().contains("auto, cgroup2, freezer or env"),
            "{e}"
        );
        let env = detect(Some("env")).expect("env is always available");
        assert_eq!(env.mode(), Mode::Env);
        assert!(env.description().contains("SKIFF_PROCESS_TRACKING=env"));
    }
}
