//! A step is untrusted code: what it runs as. When skiff runs as root, each running run gets a
//! user of its own from a range of uids (`--step-uids`), with a passwd entry (ssh, git and
//! getpass look the user up), its own HOME and TMPDIR, and a workspace only it can enter, so a
//! step cannot read skiff's data folder, skiff's environment (`/proc/PID/environ` of another
//! uid, with skiff not dumpable), another run's workspace or environment, or signal any process
//! but its own. No two running runs share a uid, across every skiff on the machine: a uid is
//! held by a lock file while its run lasts.
//!
//! Without root, each step runs in user, mount and pid namespaces of its own instead (see
//! [`step_init`]); where those are not available either, the steps run with skiff's own powers,
//! and skiff says so at start (`Isolation::Off` with its reason).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the locks that hold uids live (root's, on a tmpfs where there is one).
const UID_LOCKS: &str = "/run/skiff-uids";

/// How steps are run.
#[derive(Clone, Debug)]
pub enum Isolation {
    /// Each running run as a user of its own.
    Uids(Arc<UidPool>),
    /// skiff not root: each step in user, mount and pid namespaces of its own (through
    /// `skiff step-init`, the program at `init`), with these folders hidden.
    Namespaces { init: PathBuf, hide: Vec<PathBuf> },
    /// With skiff's own uid and powers; the reason says why.
    Off(String),
}

impl Isolation {
    /// The isolation this process can give: uids when root (unless turned off).
    /// `hide`: what a step must not see (the data folder) when it runs in namespaces.
    pub fn detect(no_isolation: bool, uids: RangeInclusive<u32>, hide: Vec<PathBuf>) -> Isolation {
        if no_isolation {
            return Isolation::Off("--no-isolation was given".into());
        }
        if nix::unistd::geteuid().is_root() {
            return Isolation::Uids(Arc::new(UidPool {
                uids,
                free: std::sync::Mutex::new(Vec::new()),
            }));
        }
        let init = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return Isolation::Off(format!("skiff cannot find its own program: {e}")),
        };
        // Tried once for real: unprivileged user namespaces may be turned off here.
        let probe = std::process::Command::new(&init)
            .args(["step-init", "--", "/bin/sh", "-c", "exit 0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output();
        match probe {
            Ok(out) if out.status.success() => Isolation::Namespaces { init, hide },
            Ok(out) => Isolation::Off(format!(
                "skiff is not root and cannot make namespaces here ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Isolation::Off(format!(
                "skiff is not root and cannot make namespaces here ({e})"
            )),
        }
    }

    /// One line for skiff's start-up and the UI.
    pub fn description(&self) -> String {
        match self {
            Isolation::Uids(pool) => format!(
                "steps run isolated: each run as a user of its own (uids {}-{}), in a workspace \
                 only it can enter",
                pool.uids.start(),
                pool.uids.end()
            ),
            Isolation::Namespaces { .. } => "steps run isolated: each in user, mount and pid \
                 namespaces of its own (skiff's processes and data folder out of sight)"
                .to_string(),
            Isolation::Off(why) => format!(
                "WARNING: steps run with skiff's own powers ({why}): a step can read skiff's data \
                 folder and secrets and act as skiff"
            ),
        }
    }

    pub fn is_on(&self) -> bool {
        !matches!(self, Isolation::Off(_))
    }
}

/// The uids of the range. A uid this process has locked stays locked (by its open lock file)
/// until the process ends, and goes back to `free` after each run: the next run reuses it
/// without a lock file or a passwd lookup.
#[derive(Debug)]
pub struct UidPool {
    uids: RangeInclusive<u32>,
    free: std::sync::Mutex<Vec<(u32, File)>>,
}

/// The user a run's steps run as, held while the run lasts; its uid goes back to the pool when
/// this is dropped (after the run's processes are gone).
#[derive(Debug)]
pub struct RunUser {
    pub uid: u32,
    pub gid: u32,
    /// Holds the uid (an exclusive lock on its file) for this process.
    lock: Option<File>,
    pool: Option<Arc<UidPool>>,
}

impl RunUser {
    /// Who a run's folders belong to: its user, else skiff itself.
    pub fn owner(user: Option<&RunUser>) -> u32 {
        user.map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid)
    }
}

impl Drop for RunUser {
    fn drop(&mut self) {
        if let (Some(pool), Some(lock)) = (self.pool.take(), self.lock.take()) {
            pool.free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((self.uid, lock));
        }
    }
}

impl UidPool {
    /// Takes a free uid: one this process holds and no run uses now, or else one no skiff here
    /// holds (locking it, making sure it has a passwd entry).
    pub fn take(self: &Arc<Self>) -> io::Result<RunUser> {
        if let Some((uid, lock)) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(RunUser {
                uid,
                gid: uid,
                lock: Some(lock),
                pool: Some(self.clone()),
            });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(UID_LOCKS)?;
        for uid in self.uids.clone() {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(Path::new(UID_LOCKS).join(uid.to_string()))?;
            match file.try_lock() {
                Ok(()) => {
                    ensure_passwd_entry(uid)?;
                    return Ok(RunUser {
                        uid,
                        gid: uid,
                        lock: Some(file),
                        pool: Some(self.clone()),
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "every step uid ({}-{}) is in use",
            self.uids.start(),
            self.uids.end()
        )))
    }
}

/// Adds `skiff-UID` to /etc/passwd and /etc/group when the uid has no entry (under the lock
/// the shadow tools use).
fn ensure_passwd_entry(uid: u32) -> io::Result<()> {
    if nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .is_some()
    {
        return Ok(());
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open("/etc/.pwd.lock")?;
    lock.lock()?;
    // The third field of a passwd or group line is its id.
    let has = |text: &str| {
        let id = uid.to_string();
        text.lines()
            .any(|l| l.split(':').nth(2) == Some(id.as_str()))
    };
    if !has(&std::fs::read_to_string("/etc/passwd")?) {
        append_line(
            Path::new("/etc/passwd"),
            &format!("skiff-{uid}:x:{uid}:{uid}:skiff step:/nonexistent:/bin/sh"),
        )?;
    }
    if !has(&std::fs::read_to_string("/etc/group").unwrap_or_default()) {
        append_line(Path::new("/etc/group"), &format!("skiff-{uid}:x:{uid}:"))?;
    }
    Ok(())
}

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(path)?;
    let text = std::fs::read(path)?;
    let sep = if text.is_empty() || text.ends_with(b"\n") {
        ""
    } else {
        "\n"
    };
    f.write_all(format!("{sep}{line}\n").as_bytes())
}

/// The folders of one run: its workspace, HOME and TMPDIR, each only its user can enter.
#[derive(Debug, Clone)]
pub struct RunDirs {
    pub workspace: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
}

impl RunDirs {
    pub fn new(root: &Path, run: &str) -> RunDirs {
        RunDirs {
            workspace: root.join(run),
            home: root.join(format!("{run}.home")),
            tmp: root.join(format!("{run}.tmp")),
        }
    }

    /// Creates the folders (mode 0700, owned by `user` when there is one), or takes a spare
    /// set an earlier run of the same user left empty. The root is made traversable (0711) but
    /// not listable, so a user reaches only its own run's folders.
    pub fn create(
        &self,
        root: &Path,
        user: Option<&RunUser>,
        spares: &SpareDirs,
    ) -> io::Result<()> {
        prepare_root(root, user.is_some())?;
        let owner = RunUser::owner(user);
        if let Some(spare) = spares.take(root, owner) {
            if spare.rename_to(self).is_ok() {
                return Ok(());
            }
            // Half moved (someone removed a folder): whatever is left goes, and the run gets
            // folders made now.
            for dir in spare.paths().iter().chain(self.paths().iter()) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        for dir in self.paths() {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            if let Some(u) = user {
                // Not following a link: the path was made just now, by skiff, under a root
                // only skiff can write.
                std::os::unix::fs::lchown(dir, Some(u.uid), Some(u.gid))?;
            }
        }
        Ok(())
    }

    fn paths(&self) -> [&PathBuf; 3] {
        [&self.workspace, &self.home, &self.tmp]
    }

    /// After the run (its processes gone): the folders are removed, the workspace only unless
    /// `keep_workspace`. Folders the run left exactly as they were made (empty, 0700, its user's,
    /// no ACL or other extended attribute) are kept as a spare set for the next run of the same
    /// user instead: a rename is all it costs then, where making and removing a folder costs a
    /// block allocation, a journal write and a discard each.
    pub fn finish(&self, root: &Path, owner: u32, keep_workspace: bool, spares: &SpareDirs) {
        if !keep_workspace
            && self.paths().iter().all(|d| pristine(d, owner))
            && let Some(spare) = spares.room(root, owner)
        {
            if self.rename_to(&spare).is_ok() {
                spares.put(owner, spare);
                return;
            }
            for dir in spare.paths() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        for dir in [&self.home, &self.tmp] {
            let _ = std::fs::remove_dir_all(dir);
        }
        if !keep_workspace
            && let Err(e) = std::fs::remove_dir_all(&self.workspace)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.workspace.display(), error = %e, "removing the workspace failed");
        }
    }

    /// Moves the three folders to `to`'s names, one rename each (an error may come after some
    /// have moved: the callers remove what is left under both names).
    fn rename_to(&self, to: &RunDirs) -> io::Result<()> {
        for (from, to) in self.paths().into_iter().zip(to.paths()) {
            std::fs::rename(from, to)?;
        }
        Ok(())
    }
}

/// Makes the workspaces root (and every folder on the way) when missing; with run users, each
/// traversable by all (skiff's umask would make them 0700) and none listable but by skiff.
fn prepare_root(root: &Path, for_users: bool) -> io::Result<()> {
    if !for_users {
        return std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root);
    }
    let mut made = Vec::new();
    let mut at = Some(root);
    while let Some(dir) = at.filter(|d| !d.exists()) {
        made.push(dir.to_path_buf());
        at = dir.parent();
    }
    for dir in made.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    }
    // A stat, and a change only when needed (a change dirties the inode, a journal write).
    if std::fs::metadata(root)?.permissions().mode() & 0o7777 != 0o711 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

/// Whether a run's folder is as it was made: a folder (not a link), mode 0700, owned by
/// `owner`, empty, without extended attributes (an ACL would let another user in).
fn pristine(dir: &Path, owner: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return false;
    };
    if !meta.file_type().is_dir() || meta.mode() & 0o7777 != 0o700 || meta.uid() != owner {
        return false;
    }
    let empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
    empty && no_xattrs(dir)
}

fn no_xattrs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zero-sized list: the kernel only returns the size
    // the names would take, writing nothing.
    #[allow(unsafe_code)]
    let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    size == 0
}

/// Empty run folder sets ([`RunDirs::finish`]) waiting for the next run of their user, named
/// `.spare-PID-N` (with `.home` and `.tmp`) under the workspaces root. Shared by every run of
/// this process; a few per user at most; removed when this is dropped (and by the next skiff
/// when this one died).
#[derive(Debug)]
pub struct SpareDirs {
    /// Sets kept per user (0: none, for a process that runs one run).
    per_user: usize,
    free: std::sync::Mutex<Vec<(u32, RunDirs)>>,
    next: std::sync::atomic::AtomicU64,
    swept: std::sync::atomic::AtomicBool,
}

/// Spare sets kept per user: the runs a worker runs at once, and then some.
const SPARES_PER_USER: usize = 8;

impl Default for SpareDirs {
    fn default() -> Self {
        SpareDirs::keeping(SPARES_PER_USER)
    }
}

impl Drop for SpareDirs {
    fn drop(&mut self) {
        for (_, dirs) in self.free().drain(..) {
            for dir in dirs.paths() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

impl SpareDirs {
    /// Keeping up to `per_user` sets for each user.
    pub fn keeping(per_user: usize) -> SpareDirs {
        SpareDirs {
            per_user,
            free: Default::default(),
            next: Default::default(),
            swept: Default::default(),
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<(u32, RunDirs)>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, root: &Path, owner: u32) -> Option<RunDirs> {
        let mut free = self.free();
        let at = free
            .iter()
            .position(|(o, d)| *o == owner && d.workspace.parent() == Some(root))?;
        Some(free.swap_remove(at).1)
    }

    /// Names for a new spare set, when there is room for one more of this user's.
    fn room(&self, root: &Path, owner: u32) -> Option<RunDirs> {
        if self.free().iter().filter(|(o, _)| *o == owner).count() >= self.per_user {
            return None;
        }
        if !self.swept.swap(true, std::sync::atomic::Ordering::Relaxed) {
            sweep_spares(root);
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(RunDirs::new(
            root,
            &format!("{SPARE_PREFIX}{}-{n}", std::process::id()),
        ))
    }

    fn put(&self, owner: u32, dirs: RunDirs) {
        self.free().push((owner, dirs));
    }
}

const SPARE_PREFIX: &str = ".spare-";

/// Removes the spare sets a skiff that is gone left under `root` (a skiff still running keeps
/// its own).
fn sweep_spares(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SPARE_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The default folder for run workspaces: outside the data folder, outside `/root`.
pub fn default_workspaces() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/skiff/work");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir).join("skiff"),
        _ => PathBuf::from(format!("/tmp/skiff-{}", nix::unistd::geteuid())),
    }
}

/// Keeps skiff's own memory and environment out of reach of processes of its uid
/// (`/proc/PID/environ`, `/proc/PID/mem`, ptrace), and makes every file it creates private.
pub fn harden_this_process() {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) and umask change only this process's attributes.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::umask(0o077);
    }
}

/// Who a step's process becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// A supplementary group given on purpose (the Docker socket's), else none at all.
    pub extra_group: Option<u32>,
}

/// The group that may use the Docker socket (`DOCKER_HOST=unix://...`, else
/// /var/run/docker.sock).
pub fn docker_socket_group() -> io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let path = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    let meta =
        std::fs::metadata(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    if meta.gid() == 0 {
        return Err(io::Error::other(format!(
            "{path} belongs to group root: giving it away would give root's group"
        )));
    }
    Ok(meta.gid())
}

/// The first process of a step run in namespaces (skiff not root): `skiff step-init --hide DIR
/// ... -- PROGRAM ARGS...`. It makes new user, mount and pid namespaces (the user's own uid
/// mapped to itself, so the step keeps no capability), hides each DIR under an empty read-only
/// tmpfs, and starts a process that is pid 1 there: it mounts a fresh /proc (skiff and every
/// other process out of sight) and runs PROGRAM, reaping whatever PROGRAM leaves behind. When
/// PROGRAM ends, pid 1 ends, and with it every process in the namespace (nothing outlives its
/// step). Signals sent to the step's process group reach PROGRAM; this process and pid 1 wait.
/// Returns the exit code (128 + the signal for a PROGRAM killed by one).
pub fn step_init(
    hide: &[PathBuf],
    private: Option<&Path>,
    keep: &[PathBuf],
    program: &[std::ffi::OsString],
) -> i32 {
    match step_init_inner(hide, private, keep, program) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff step-init: {e}");
            126
        }
    }
}

fn step_init_inner(
    hide: &[PathBuf],
    private: Option<&Path>,
    keep: &[PathBuf],
    program: &[std::ffi::OsString],
) -> io::Result<i32> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    use nix::sys::signal::{SigHandler, Signal, signal};
    use nix::sys::wait::waitpid;
    use nix::unistd::{ForkResult, fork};
    let Some((prog, args)) = program.split_first() else {
        return Err(io::Error::other("no program to run"));
    };
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
        .map_err(|e| io::Error::other(format!("user namespaces are not available: {e}")))?;
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
    let sealed = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for dir in hide.iter().filter(|d| d.exists()) {
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            sealed,
            Some("size=4k,mode=000"),
        )?;
    }
    if let Some(root) = private {
        show_only(root, keep)?;
    }
    // This process and pid 1 outlast a SIGTERM or Ctrl-C sent to the group: PROGRAM gets it.
    let held = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ];
    // SAFETY: single-threaded here (a freshly started process); SIG_IGN installs no handler.
    #[allow(unsafe_code)]
    unsafe {
        for s in held {
            let _ = signal(s, SigHandler::SigIgn);
        }
    }
    // SAFETY: this process has one thread, so the child may do anything before it execs.
    #[allow(unsafe_code)]
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { child } => Ok(exit_code(waitpid(child, None)?)),
        ForkResult::Child => {
            // pid 1 of the new pid namespace.
            let code = (|| -> io::Result<i32> {
                mount(
                    Some("proc"),
                    "/proc",
                    Some("proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    none,
                )?;
                let mut cmd = std::process::Command::new(prog);
                cmd.args(args);
                // SAFETY: resetting dispositions is async-signal-safe.
                #[allow(unsafe_code)]
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        for s in held {
                            let _ = signal(s, SigHandler::SigDfl);
                        }
                        Ok(())
                    });
                }
                let main = cmd.spawn()?;
                let main = nix::unistd::Pid::from_raw(main.id() as i32);
                // Reap everything; end when the step's program ends.
                loop {
                    match waitpid(None, None) {
                        Ok(status) if status.pid() == Some(main) => return Ok(exit_code(status)),
                        Ok(_) => {}
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            })();
            std::process::exit(code.unwrap_or_else(|e| {
                eprintln!("skiff step-init: {e}");
                126
            }))
        }
    }
}

/// Covers `root` with an empty tmpfs, then mounts back only the `keep` entries directly inside
/// it (folders and files), and makes the cover read-only.
fn show_only(root: &Path, keep: &[PathBuf]) -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    use std::os::fd::AsRawFd;
    let none: Option<&str> = None;
    // Opened before the cover hides them.
    let mut kept = Vec::new();
    for path in keep {
        if path.parent() != Some(root) {
            return Err(io::Error::other(format!(
                "{} is not directly inside {}",
                path.display(),
                root.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
        let is_dir = file.metadata()?.is_dir();
        kept.push((path, file, is_dir));
    }
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=64k,mode=711"),
    )?;
    for (path, file, is_dir) in &kept {
        if *is_dir {
            std::fs::create_dir(path)?;
        } else {
            File::create(path)?;
        }
        let source = format!("/proc/self/fd/{}", file.as_raw_fd());
        mount(Some(source.as_str()), *path, none, MsFlags::MS_BIND, none)?;
    }
    mount(
        none,
        root,
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        none,
    )?;
    Ok(())
}

fn exit_code(status: nix::sys::wait::WaitStatus) -> i32 {
    match status {
        nix::sys::wait::WaitStatus::Exited(_, code) => code,
        nix::sys::wait::WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}
