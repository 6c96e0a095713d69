//! Starting a step's process directly inside its run's cgroup v2, with `clone3` and
//! `CLONE_INTO_CGROUP`: the kernel creates the child in the cgroup, so it never runs anywhere
//! else. Moving a process into a cgroup after it starts (a write to `cgroup.procs` between fork
//! and exec) takes the kernel's cgroup migration lock for writing, which waits out an RCU grace
//! period: 10 to 20 ms on the way from a trigger to its step, where skiff's whole budget is 3 ms.
//! Like `posix_spawn`, the clone is `CLONE_VM | CLONE_VFORK`: the child runs on a stack of its own
//! in skiff's memory while skiff's thread waits, until it execs. A `fork` instead would copy
//! skiff's page tables and make skiff fault on every page it writes afterwards (a third of a
//! trivial run's cost). glibc 2.36 has no `posix_spawnattr_setcgroup_np`, hence the clone here.
//!
//! The child makes only system calls on values prepared before the clone, and leaves by
//! `execve` or `_exit`. All signals are blocked in the parent's thread around the clone, so no
//! signal handler runs in the child on the shared memory; the child unblocks them just before
//! `execve`.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// What to start.
pub struct Start<'a> {
    pub program: &'a Path,
    pub args: &'a [&'a OsStr],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The cgroup's directory, opened.
    pub cgroup: BorrowedFd<'a>,
    /// Who to run as; `None`: skiff's own.
    pub user: Option<crate::isolation::Creds>,
}

/// A started process, the leader of a new process group.
pub struct Child {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// Whether steps can be started inside a cgroup v2 here (x86-64 Linux: the clone's entry is a
/// few lines of assembly).
pub fn available() -> bool {
    cfg!(all(target_arch = "x86_64", target_os = "linux"))
}

/// The kernel's `struct clone_args` (its size with `cgroup`: 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// The child's stack. It runs a handful of system calls.
const CHILD_STACK: usize = 64 << 10;

/// Everything the child reads, and where it leaves the errno of a failed step.
#[repr(C)]
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdout: libc::c_int,
    stderr: libc::c_int,
    /// Whether to become `uid`/`gid` (with no supplementary groups).
    set_user: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// Supplementary groups: 0 or 1 of `group`.
    groups: usize,
    group: libc::gid_t,
    /// Set by the child when it could not exec (read by the parent once the clone returns).
    errno: libc::c_int,
}

/// `skiff_clone3`: a leaf function that makes the `clone3` system call and, in the child, calls
/// the given function on the child's stack (what glibc's `clone` does for `clone(2)`).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
mod entry {
    std::arch::global_asm!(
        // i64 skiff_clone3(struct clone_args *args, size_t size, void (*child)(void *), void *arg)
        // The parent returns the child's pid (or -errno). The child, on its own stack, calls
        // child(arg), which never returns (it execs or exits).
        ".globl skiff_clone3",
        ".type skiff_clone3, @function",
        "skiff_clone3:",
        "mov r8, rdx",
        "mov r9, rcx",
        "mov eax, 435",
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "xor ebp, ebp",
        "mov rdi, r9",
        "call r8",
        "mov edi, 127",
        "mov eax, 60",
        "syscall",
        "2:",
        "ret",
    );
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
unsafe extern "C" {
    fn skiff_clone3(
        args: *const CloneArgs,
        size: usize,
        child: extern "C" fn(*mut ChildArgs) -> !,
        arg: *mut ChildArgs,
    ) -> i64;
}

/// The child, between the clone and `execve`: only system calls on prepared values.
#[allow(unsafe_code)]
extern "C" fn child_main(args: *mut ChildArgs) -> ! {
    // SAFETY: `args` points at the parent's `ChildArgs`, alive while the parent waits for this
    // child to exec or exit (CLONE_VFORK); every pointer in it is a NUL-terminated string or a
    // null-terminated array the parent keeps alive just as long. Each call is async-signal-safe.
    unsafe {
        let a = &mut *args;
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        // Rust ignores SIGPIPE, and an ignored signal stays ignored across exec.
        libc::sigaction(libc::SIGPIPE, &default, std::ptr::null_mut());
        // Raw system calls for the credentials: glibc's setuid() would try to change every
        // thread of what it takes for its process (this child shares skiff's memory).
        if a.set_user
            && (libc::syscall(
                libc::SYS_setgroups,
                a.groups,
                &a.group as *const libc::gid_t,
            ) != 0
                || libc::syscall(libc::SYS_setresgid, a.gid, a.gid, a.gid) != 0
                || libc::syscall(libc::SYS_setresuid, a.uid, a.uid, a.uid) != 0)
        {
            a.errno = *libc::__errno_location();
            libc::_exit(127);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null < 0
            || libc::setpgid(0, 0) != 0
            || libc::dup2(null, 0) < 0
            || libc::dup2(a.stdout, 1) < 0
            || libc::dup2(a.stderr, 2) < 0
            || libc::chdir(a.cwd) != 0
        {
            a.errno = *libc::__errno_location();
            libc::_exit(127);
        }
        // Only fds 0-2 reach the step, whatever skiff inherited; the usual umask, not skiff's.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::umask(0o022);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        a.errno = *libc::__errno_location();
        libc::_exit(127)
    }
}

/// Starts `start` in its cgroup. An error (no `clone3`, a cgroup that refuses processes, an
/// `execve` that fails) comes back as `Err`.
#[allow(unsafe_code)]
pub fn spawn(start: Start<'_>) -> io::Result<Child> {
    let program = c_string(start.program.as_os_str().as_bytes())?;
    let mut argv_owned = vec![program.clone()];
    for a in start.args {
        argv_owned.push(c_string(a.as_bytes())?);
    }
    let mut envp_owned = Vec::with_capacity(start.env.len());
    for (k, v) in start.env {
        envp_owned.push(c_string(format!("{k}={v}").as_bytes())?);
    }
    let cwd = c_string(start.cwd.as_os_str().as_bytes())?;
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_owned.iter().map(|s| s.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut child_args = ChildArgs {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd.as_ptr(),
        stdout: start.stdout.as_raw_fd(),
        stderr: start.stderr.as_raw_fd(),
        set_user: start.user.is_some(),
        uid: start.user.map_or(0, |u| u.uid),
        gid: start.user.map_or(0, |u| u.gid),
        groups: start
            .user
            .map_or(0, |u| usize::from(u.extra_group.is_some())),
        group: start.user.and_then(|u| u.extra_group).unwrap_or(0),
        errno: 0,
    };
    let mut stack = vec![0u8; CHILD_STACK];
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: CHILD_STACK as u64,
        cgroup: start.cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: the clone shares this memory with the child (CLONE_VM) and suspends this thread
    // until the child has exec'd or exited (CLONE_VFORK), so everything it reads (`child_args`,
    // the strings and arrays it points into, `stack`) outlives its use. Signals are blocked in
    // this thread around the clone (the child inherits the mask), so no handler runs in the
    // child; the child unblocks them before exec. `pidfd` is written by the kernel on success.
    let ret = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let ret = skiff_clone3(
            &args,
            std::mem::size_of::<CloneArgs>(),
            child_main,
            &mut child_args,
        );
        // Elsewhere `available()` is false and this is never called.
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let ret = -i64::from(libc::ENOSYS);
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        ret
    };
    drop(stack);
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(
            i32::try_from(-ret).unwrap_or(libc::EINVAL),
        ));
    }
    let pid = Pid::from_raw(i32::try_from(ret).unwrap_or(0));
    // SAFETY: the kernel returned a new pidfd, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    if child_args.errno != 0 {
        // It did not exec: it has exited; reap it.
        let _ = waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(child_args.errno));
    }
    // The parent's copies of the output pipe: the child has its own.
    drop(start.stdout);
    drop(start.stderr);
    Ok(Child {
        pid,
        pidfd: watch(pidfd)?,
        status: None,
    })
}

/// Registers the pidfd with tokio's reactor (readable: the process exited).
#[allow(unsafe_code)]
fn watch(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid, open descriptor that stays open, and refers to the same
    // file, until it is dropped, which happens with the `AsyncFd`.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

impl Child {
    pub fn id(&self) -> Pid {
        self.pid
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            if let Some(status) = self.try_reap()? {
                self.status = Some(status);
                continue;
            }
            // The pidfd becomes readable when the process exits.
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        Ok(match waitpid(self.pid, Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::Exited(_, code) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
            WaitStatus::Signaled(_, signal, core) => Some(ExitStatus::from_raw(
                signal as i32 | if core { 0x80 } else { 0 },
            )),
            _ => None,
        })
    }

    /// SIGKILL to the process (not its group), unless it has been reaped.
    pub fn kill(&self) {
        if self.status.is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Child {
    /// A child dropped before it was reaped is killed and reaped (on a blocking thread: it may
    /// take a moment to die), so it neither outlives its step nor stays a zombie.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let pid = self.pid;
        let _ = kill(pid, Signal::SIGKILL);
        let reap = move || {
            let _ = waitpid(pid, None);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(reap);
            }
            Err(_) => reap(),
        }
    }
}
