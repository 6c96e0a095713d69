//! Process tracking: a step's processes end with the step even when they left its process group
//! (`setsid`) and dropped `SKIFF_RUN_ID`, in each tracking mode this machine offers (cgroup v2 and
//! the cgroup v1 freezer, forced with `SKIFF_PROCESS_TRACKING`), and after a crash. These tests
//! need root and both hierarchies writable; without them they fail, they do not skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::harness::Server;
use crate::harness::{Sandbox, alive, all_gone, pids, run_to_end};

const CGROUP2: &str = "cgroup2";
const FREEZER: &str = "freezer";

/// A step that starts three processes out of its process group, two of them without
/// `SKIFF_RUN_ID`, writes their pids to `pidfile`, then runs `then`. The first keeps the step's
/// output open.
fn escaping_pipeline(pidfile: &Path, then: &str) -> String {
    format!(
        "steps:\n  - run: |\n      : > {p}\n      setsid sh -c 'echo $$ >> {p}; exec sleep 1000' &\n      env -u SKIFF_RUN_ID setsid sh -c 'echo $$ >> {p}; sleep 1000 & echo $! >> {p}; wait' > /dev/null 2>&1 &\n      until [ \"$(wc -l < {p})\" -ge 3 ]; do sleep 0.01; done\n      echo escaped\n      {then}\n",
        p = pidfile.display()
    )
}

fn kill_all(pids: &[i32]) {
    for p in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The start message of `skiff run` in `mode` (it names where runs' cgroups are made).
fn start_message(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("skiff: steps are tracked by"))
        .unwrap_or_else(|| panic!("no tracking line at start:\n{stderr}"))
}

/// Where runs' cgroups are made in `mode`, as `skiff run` says at start.
fn base_of(sb: &Sandbox, mode: &str) -> PathBuf {
    let file = sb.pipeline("noop", "steps:\n  - run: \"true\"\n");
    let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
    cmd.env("SKIFF_PROCESS_TRACKING", mode);
    let out = run_to_end(cmd);
    assert_eq!(
        out.code,
        Some(0),
        "this test needs {mode} tracking (root, a writable hierarchy): {}",
        out.all()
    );
    let line = start_message(&out.stderr);
    let path = line
        .split(" at ")
        .nth(1)
        .and_then(|rest| rest.split(" (").next())
        .unwrap_or_else(|| panic!("no path in {line:?}"));
    PathBuf::from(path)
}

fn run_id(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no run id in:\n{stderr}"))
        .to_string()
}

fn escapees_end_with_their_step(mode: &str) {
    let sb = Sandbox::new();
    let pidfile = sb.path().join("pids");
    let file = sb.pipeline("escape", &escaping_pipeline(&pidfile, "exit 0"));
    let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
    cmd.env("SKIFF_PROCESS_TRACKING", mode);
    let out = run_to_end(cmd);
    let left = pids(&pidfile);
    assert_eq!(left.len(), 3, "{left:?}\n{}", out.all());
    let gone = all_gone(&left);
    kill_all(&left);
    assert!(
        gone,
        "processes that left the step's group and dropped SKIFF_RUN_ID end with the step ({mode})"
    );
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("escaped"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("holds its output open"),
        "nothing is left holding the output: {}",
        out.stdout
    );
    let line = start_message(&out.stderr);
    let base = base_of(&sb, mode);
    assert!(line.contains(&base.display().to_string()), "{line}");
    assert!(
        !base.join(run_id(&out.stderr)).exists(),
        "the run's cgroup is removed when the run ends"
    );
}

#[test]
fn escapees_end_with_their_step_under_cgroup2() {
    escapees_end_with_their_step(CGROUP2);
}

#[test]
fn escapees_end_with_their_step_under_the_freezer() {
    escapees_end_with_their_step(FREEZER);
}

#[test]
fn escapees_of_a_timed_out_step_end_too() {
    for mode in [CGROUP2, FREEZER] {
        let sb = Sandbox::new();
        let pidfile = sb.path().join("pids");
        let yaml = escaping_pipeline(&pidfile, "sleep 1000").replacen(
            "  - run: |",
            "  - timeout: 1s\n    run: |",
            1,
        );
        let file = sb.pipeline("escape", &yaml);
        let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
        cmd.env("SKIFF_PROCESS_TRACKING", mode);
        let out = run_to_end(cmd);
        let left = pids(&pidfile);
        let gone = all_gone(&left);
        kill_all(&left);
        assert_eq!(left.len(), 3, "{left:?}\n{}", out.all());
        assert!(gone, "a timed-out step's escapees end with it ({mode})");
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(
            out.stdout.contains("timed out after 1.0s"),
            "{}",
            out.stdout
        );
    }
}

/// The documented limit of the `env` mode: without a cgroup, a process that leaves the step's
/// group outlives the step.
#[test]
fn without_a_cgroup_escapees_outlive_their_step() {
    let sb = Sandbox::new();
    let pidfile = sb.path().join("pids");
    let file = sb.pipeline("escape", &escaping_pipeline(&pidfile, "exit 0"));
    let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
    cmd.env("SKIFF_PROCESS_TRACKING", "env");
    let out = run_to_end(cmd);
    let left = pids(&pidfile);
    let survived = left.iter().all(|p| alive(*p));
    kill_all(&left);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(left.len(), 3, "{left:?}\n{}", out.all());
    assert!(survived, "in env mode, escapees outlive the step");
    let line = start_message(&out.stderr);
    assert!(
        line.contains("process group and the SKIFF_RUN_ID marker (SKIFF_PROCESS_TRACKING=env)")
            && line.contains("unsets SKIFF_RUN_ID outlives its step"),
        "the start message states the limit: {line}"
    );
    assert!(
        out.stdout.contains("holds its output open"),
        "the step's log says an escapee kept its output open: {}",
        out.stdout
    );
}

#[test]
fn the_start_message_names_the_mode() {
    let sb = Sandbox::new();
    for (mode, says) in [
        (CGROUP2, "skiff: steps are tracked by cgroup v2 at "),
        (
            FREEZER,
            "skiff: steps are tracked by the cgroup v1 freezer at ",
        ),
        (
            "env",
            "skiff: steps are tracked by process group and the SKIFF_RUN_ID marker",
        ),
    ] {
        let base = (mode != "env").then(|| base_of(&sb, mode));
        // `skiff serve` says it before `listening on`.
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SKIFF_DATA", sb.path().join("serve-data"))
            .env("SKIFF_PIPELINES", sb.path().join("none"))
            .env("SKIFF_PROCESS_TRACKING", mode)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start skiff serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.expect("read");
            let done = line.starts_with("skiff: listening on");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let first = lines.first().map(String::as_str).unwrap_or("");
        assert!(first.starts_with(says), "{mode}: {lines:?}");
        if let Some(base) = base {
            assert!(first.contains(&base.display().to_string()), "{first}");
        }
        assert!(
            lines
                .last()
                .is_some_and(|l| l.starts_with("skiff: listening on")),
            "{lines:?}"
        );
    }
    let file = sb.pipeline("noop", "steps:\n  - run: \"true\"\n");
    let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
    cmd.env("SKIFF_PROCESS_TRACKING", "sometimes");
    let out = run_to_end(cmd);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.stderr.contains(
            "SKIFF_PROCESS_TRACKING must be auto, cgroup2, freezer or env, not `sometimes`"
        ),
        "{}",
        out.stderr
    );
}

/// `skiff ARGS` in a mount namespace where the cgroup hierarchies are read-only, as in most
/// containers.
fn in_read_only_cgroupfs(sb: &Sandbox, args: &[&str], mode: &str) -> crate::harness::Out {
    let skiff = env!("CARGO_BIN_EXE_skiff");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -o remount,bind,ro /sys/fs/cgroup/unified && mount -o remount,bind,ro /sys/fs/cgroup/freezer && exec \"$@\"",
        "sh",
        skiff,
    ])
    .args(args)
    .env("SKIFF_DATA", sb.data())
    .env("NO_COLOR", "1")
    .env("SKIFF_PROCESS_TRACKING", mode)
    .current_dir(sb.path())
    .stdin(Stdio::null());
    run_to_end(cmd)
}

#[test]
fn with_a_read_only_cgroupfs_auto_falls_back_and_a_forced_mode_is_refused() {
    let sb = Sandbox::new();
    let file = sb.pipeline("noop", "steps:\n  - run: echo ran\n");
    let path = file.to_str().expect("path");
    let out = in_read_only_cgroupfs(&sb, &["run", path], "auto");
    assert_eq!(out.code, Some(0), "{}", out.all());
    let line = start_message(&out.stderr);
    assert!(
        line.contains("SKIFF_RUN_ID marker (no usable cgroup: cgroup v2: ")
            && line.contains("Read-only file system"),
        "{line}"
    );
    assert!(out.stdout.contains("ran"), "{}", out.stdout);
    for mode in [CGROUP2, FREEZER] {
        let out = in_read_only_cgroupfs(&sb, &["run", path], mode);
        assert_eq!(out.code, Some(2), "{}", out.all());
        assert!(
            out.stderr.contains(&format!(
                "skiff: error: SKIFF_PROCESS_TRACKING={mode}, but "
            )) && out.stderr.contains("Read-only file system"),
            "{}",
            out.stderr
        );
        assert!(!out.stdout.contains("ran"), "{}", out.stdout);
    }
}

fn crash_leaves_no_escapees(mode: &str) {
    let base = base_of(&Sandbox::new(), mode);
    let scratch = crate::harness::scratch();
    let pidfile = scratch.path().join("pids");
    let s = Server::start_with(
        &[("long", &escaping_pipeline(&pidfile, "sleep 1000"))],
        &[("SKIFF_WORKERS", "1"), ("SKIFF_PROCESS_TRACKING", mode)],
    );
    let id = s.trigger("long", json!({}));
    s.wait_for_log(&id, "escaped");
    let mut s = s;
    s.crash();
    let left = pids(&pidfile);
    assert_eq!(left.len(), 3, "{left:?}");
    // The run's cgroup: the one under skiff's base that holds the step's processes.
    let cgroup = std::fs::read_dir(&base)
        .expect("the base")
        .flatten()
        .map(|e| e.path())
        .find(|dir| {
            std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
                procs
                    .lines()
                    .any(|m| left.iter().any(|p| m == p.to_string()))
            })
        })
        .unwrap_or_else(|| panic!("no cgroup under {} holds {left:?}", base.display()));
    let members = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    let survived = left.iter().all(|p| alive(*p));
    if !survived {
        kill_all(&left);
    }
    assert!(survived, "a crash leaves the step's processes running");
    for p in &left {
        assert!(
            members.lines().any(|m| m == p.to_string()),
            "{p} is in the run's cgroup {}: {members}",
            cgroup.display()
        );
    }
    let s = s.restart();
    let run = s.wait_for_end(&id);
    let gone = all_gone(&left);
    kill_all(&left);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        gone,
        "the escapees of the interrupted run are ended at the next start ({mode})"
    );
    assert!(
        !cgroup.exists(),
        "the interrupted run's cgroup is removed: {}",
        cgroup.display()
    );
}

#[test]
fn escapees_of_a_run_interrupted_by_a_crash_end_at_the_next_start_cgroup2() {
    crash_leaves_no_escapees(CGROUP2);
}

#[test]
fn escapees_of_a_run_interrupted_by_a_crash_end_at_the_next_start_freezer() {
    crash_leaves_no_escapees(FREEZER);
}

#[test]
fn empty_cgroups_left_by_a_killed_skiff_are_removed_at_start() {
    for mode in [CGROUP2, FREEZER] {
        let sb = Sandbox::new();
        let base = base_of(&sb, mode);
        let me = std::process::id();
        let left = base.join(format!("left-by-a-crash-{me}"));
        let held = base.join(format!("held-by-a-live-skiff-{me}"));
        std::fs::create_dir(&left).expect("mkdir");
        std::fs::create_dir(&held).expect("mkdir");
        let lock = nix::fcntl::Flock::lock(
            std::fs::File::open(&held).expect("open"),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| e)
        .expect("flock");
        let still_there = base_of(&sb, mode);
        let (left_gone, held_kept) = (!left.exists(), held.exists());
        drop(lock);
        let _ = std::fs::remove_dir(&held);
        let _ = std::fs::remove_dir(&left);
        assert_eq!(still_there, base);
        assert!(
            left_gone,
            "an empty cgroup nobody holds is removed ({mode})"
        );
        assert!(held_kept, "a cgroup a live skiff holds is kept ({mode})");
    }
}
