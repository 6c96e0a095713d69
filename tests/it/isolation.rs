//! A step is untrusted code. These tests attack from inside steps, as a hostile pipeline (or a
//! hostile git push) would, against a server running as root (each run as a user of its own):
//! the server's environment and memory, its data folder and database, its sign-in links, other
//! runs' workspaces and processes, files through a link at `$SKIFF_OUTPUT`, fds skiff inherited.

use serde_json::json;

use crate::harness::{ADMIN_TOKEN, Server, scratch};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn a_step_cannot_reach_the_server_its_data_or_its_secrets() {
    assert!(
        is_root(),
        "this test attacks the uid isolation skiff gives as root: run the tests as root"
    );
    let s = Server::start_with(
        &[],
        &[("SKIFF_SECRET_DEPLOY_KEY", "s3cr3t-deploy-key-value")],
    );
    let data = s.data_dir();
    let skiff = env!("CARGO_BIN_EXE_skiff");
    let attack = format!(
        r#"steps:
  - run: |
      echo "whoami=$(id -un) uid=$(id -u) home=$HOME"
      [ "$HOME" != /root ] && [ -O "$HOME" ] && echo home-is-mine
      [ -O "$SKIFF_WORKSPACE" ] && echo workspace-is-mine
      fds=""; for f in /proc/$$/fd/*; do fds="$fds ${{f##*/}}"; done; echo "fds:$fds."
      (tr '\0' '\n' < /proc/$PPID/environ) 2>&1 | sed 's/^/environ: /' | head -50 || true
      (base64 -w0 /proc/$PPID/environ) 2>&1 | sed 's/^/environ64: /' || true
      (cat /proc/$PPID/cmdline | tr '\0' ' ') 2>&1 | sed 's/^/cmdline: /' || true
      (ls -la {data}) 2>&1 | sed 's/^/data: /' || true
      (base64 -w0 {data}/skiff.db) 2>&1 | head -c 300 | sed 's/^/db: /' || true
      ({skiff} login-link --data {data}) 2>&1 | sed 's/^/link: /' || true
      (kill -0 $PPID && echo SIGNALLED-THE-SERVER) 2>&1 | sed 's/^/kill: /' || true
      (ln -sf /etc/shadow "$SKIFF_OUTPUT" && echo LINKED) 2>&1 | sed 's/^/ln: /' || true
      echo done
"#,
        data = data.display(),
    );
    std::fs::write(s.pipelines_dir().join("attack.yml"), attack).expect("write");
    crate::harness::eventually("the pipeline is loaded", || {
        s.api("GET", "/api/pipelines/attack", None).0 == 200
    });
    let id = s.trigger("attack", json!({}));
    let run = s.wait_for_end(&id);
    let log = s.log_text(&id);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(
        log.contains("whoami=skiff-"),
        "the step has a user of its own: {log}"
    );
    assert!(
        log.contains("home-is-mine") && log.contains("workspace-is-mine"),
        "{log}"
    );
    // The shell's own descriptors (listed by the shell itself: the listing holds fd 3 open).
    let fds: Vec<u32> = log
        .split("fds:")
        .nth(1)
        .and_then(|r| r.split('.').next())
        .map(|l| {
            l.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        fds.starts_with(&[0, 1, 2]) && fds.iter().all(|f| *f <= 3),
        "a step gets fds 0-2 only: {fds:?}\n{log}"
    );
    for leak in [
        ADMIN_TOKEN,
        "s3cr3t-deploy-key-value",
        "SKIFF_SECRET_DEPLOY_KEY",
        "SKIFF_ADMIN_TOKEN",
        // base64 of "SKIFF_" at each alignment would dodge a masker; the file must not be read.
        "environ64: U0tJRk",
        "U1FMaXRlIGZvcm1hdCAz", // "SQLite format 3"
        "/login/link/",
        "SIGNALLED-THE-SERVER",
        "LINKED",
        "root:",
    ] {
        assert!(!log.contains(leak), "the step reached {leak:?}:\n{log}");
    }
    assert!(log.contains("done"), "{log}");
    // The data folder is skiff's alone, whoever else is on the machine.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| p.metadata().expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for entry in std::fs::read_dir(&data).expect("data").flatten() {
        let m = mode(&entry.path());
        assert!(m & 0o077 == 0, "{} is mode {m:o}", entry.path().display());
    }
}

#[test]
fn runs_cannot_reach_each_other() {
    assert!(is_root(), "run the tests as root");
    let shared = scratch();
    let board = shared.path().display().to_string();
    let victim = format!(
        r#"steps:
  - run: |
      echo private-data > "$SKIFF_WORKSPACE/secret.txt"
      echo "$SKIFF_WORKSPACE" > {board}/victim-workspace
      echo $$ > {board}/victim-pid
      export VICTIM_TOKEN=victim-env-value
      sleep 30 &
      echo $! > {board}/victim-child
      echo ready
      wait
"#
    );
    let attacker = format!(
        r#"steps:
  - run: |
      ws=$(cat {board}/victim-workspace); pid=$(cat {board}/victim-pid); child=$(cat {board}/victim-child)
      (cat "$ws/secret.txt") 2>&1 | sed 's/^/read: /' || true
      (ls "$(dirname "$ws")") 2>&1 | sed 's/^/list: /' || true
      (tr '\0' '\n' < /proc/$child/environ) 2>&1 | sed 's/^/environ: /' || true
      (kill -9 $pid $child && echo KILLED-THE-OTHER-RUN) 2>&1 | sed 's/^/kill: /' || true
      echo done
"#
    );
    let s = Server::start(&[("victim", &victim), ("attacker", &attacker)]);
    let v = s.trigger("victim", json!({}));
    s.wait_for_log(&v, "ready");
    let a = s.trigger("attacker", json!({}));
    let run = s.wait_for_end(&a);
    let log = s.log_text(&a);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    for leak in ["private-data", "victim-env-value", "KILLED-THE-OTHER-RUN"] {
        assert!(
            !log.contains(leak),
            "one run reached another's {leak:?}:\n{log}"
        );
    }
    assert!(
        !log.contains(&format!("list: {v}")),
        "the workspaces folder is not listable: {log}"
    );
    assert!(log.contains("done"), "{log}");
    let (_, victim_run) = s.api("GET", &format!("/api/runs/{v}"), None);
    assert_eq!(victim_run["status"], "running", "the victim is untouched");
    let (status, _) = s.api("POST", &format!("/api/runs/{v}/cancel"), None);
    assert_eq!(status, 202);
    s.wait_for_end(&v);
}

/// A secret that reaches an action's input is masked in everything skiff writes about it: the
/// action's log lines, the step's and the run's reason, the API and the live stream.
#[test]
fn a_secret_in_an_action_input_never_shows() {
    let secret = "tok-8f3e9a1c77d2";
    let s = Server::start_with(
        &[(
            "leaky",
            "steps:\n  - uses: http/wait\n    with: { url: \"http://127.0.0.1:1/health?key=${{ secrets.API_KEY }}\", timeout: 300ms, interval: 100ms }\n",
        )],
        &[("SKIFF_SECRET_API_KEY", secret)],
    );
    let id = s.trigger("leaky", json!({}));
    let events = s.follow(&id, None);
    let (_, run) = s.api("GET", &format!("/api/runs/{id}"), None);
    let log = s.log_text(&id);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(log.contains("key=***"), "the URL is shown, masked: {log}");
    let reason = run["steps"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("key=***"), "{run}");
    for (what, text) in [
        ("log", log),
        ("run", run.to_string()),
        ("stream", format!("{events:?}")),
    ] {
        assert!(
            !text.contains(secret),
            "the secret shows in the {what}: {text}"
        );
    }
}

const DOCKER_PING: &str = "curl -s --max-time 5 --unix-socket /var/run/docker.sock http://docker/_ping && echo ' <- the engine answered'";

/// The Docker socket is root on the host: a step reaches it only when the worker allows it and
/// the pipeline asks for it.
#[test]
fn the_docker_socket_needs_the_worker_and_the_pipeline_to_say_so() {
    assert!(is_root(), "run the tests as root");
    assert!(
        std::path::Path::new("/var/run/docker.sock").exists(),
        "this test needs the Docker engine's socket at /var/run/docker.sock"
    );
    let asks = format!("permissions: [docker]\nsteps:\n  - run: {DOCKER_PING}\n");
    let plain = format!("steps:\n  - run: {DOCKER_PING} || echo refused\n");
    let pipelines = [("asks", asks.as_str()), ("plain", plain.as_str())];
    // A pipeline that does not ask is refused by the socket, whatever the worker allows.
    let refused = |s: &Server| {
        let (_, log) = s.run_and_wait("plain", json!({}));
        assert!(
            log.contains("refused") && !log.contains("engine answered"),
            "{log}"
        );
    };
    // A worker that does not allow it.
    let s = Server::start(&pipelines);
    let (run, _) = s.run_and_wait("asks", json!({}));
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--allow-docker-steps")),
        "{run}"
    );
    refused(&s);
    drop(s);
    // A worker that allows it: only the pipeline that asks gets it.
    let s = Server::start_with(&pipelines, &[("SKIFF_ALLOW_DOCKER_STEPS", "true")]);
    let (run, log) = s.run_and_wait("asks", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(log.contains("OK <- the engine answered"), "{log}");
    refused(&s);
}

/// `--no-isolation` gives isolation away on purpose, and says so where the owner looks.
#[test]
fn without_isolation_skiff_says_so() {
    let s = Server::start_with(
        &[("who", "steps:\n  - run: echo \"uid=$(id -u)\"\n")],
        &[("SKIFF_NO_ISOLATION", "true")],
    );
    let id = s.trigger("who", json!({}));
    s.wait_for_end(&id);
    let me = nix::unistd::geteuid().as_raw();
    assert!(s.log_text(&id).contains(&format!("uid={me}\n")));
    let cookie = crate::api::sign_in(&s);
    let (_, _, page) = crate::harness::raw("GET", &s.url("/"), None, &[("cookie", &cookie)]);
    assert!(
        page.contains(r#"id="steps-warning""#) && page.contains("skiff&#39;s own powers"),
        "{page}"
    );
}

/// Without root, each step runs in user, mount and pid namespaces of its own: skiff's processes
/// are out of sight (and out of reach), its data folder is hidden, and what a step leaves
/// running ends with it, even after `setsid` with `SKIFF_RUN_ID` unset.
#[test]
fn without_root_steps_run_in_namespaces() {
    assert!(
        is_root(),
        "this test starts skiff as `nobody`: run the tests as root"
    );
    let dir = scratch();
    let skiff = dir.path().join("skiff");
    // A link to the binary where `nobody` can reach it (the build folder may not be).
    if std::fs::hard_link(env!("CARGO_BIN_EXE_skiff"), &skiff).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_skiff"), &skiff).expect("copy skiff");
    }
    let data = dir.path().join("data");
    // Another run's workspace, of the same user (runs share skiff's uid here).
    let other = dir.path().join("work").join("another-run");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("secret.txt"), "another-run-private").expect("write");
    for p in [
        dir.path().join("work"),
        other.clone(),
        other.join("secret.txt"),
    ] {
        nix::unistd::chown(&p, Some(65534.into()), Some(65534.into())).expect("chown");
    }
    let file = dir.path().join("attack.yml");
    std::fs::write(
        &file,
        format!(
            r#"steps:
  - run: |
      echo "uid=$(id -u) pid=$$"
      echo "procs=$(ls /proc | grep -c '^[0-9]')"
      (ls {data} || true) 2>&1 | sed 's/^/data: /'
      (cat {data}/skiff.db | head -c 20 || true) 2>&1 | sed 's/^/db: /'
      (cat "$(dirname "$SKIFF_WORKSPACE")/another-run/secret.txt" || true) 2>&1 | sed 's/^/other: /'
      echo "home-ok" > "$HOME/x" && cat "$HOME/x"
      echo "color=green" >> "$SKIFF_OUTPUT"
      env -u SKIFF_RUN_ID setsid sleep 1234 > /dev/null 2>&1 < /dev/null &
      echo left-one-behind
  - env: {{ C: "${{{{ steps.step-1.outputs.color }}}}" }}
    run: echo "output=$C"
"#,
            data = data.display()
        ),
    )
    .expect("write");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&skiff)
        .args(["run", &file.display().to_string(), "--data"])
        .arg(&data)
        .arg("--workspaces")
        .arg(dir.path().join("work"))
        .env("NO_COLOR", "1")
        .env_remove("SKIFF_DATA")
        .env_remove("SKIFF_WORKSPACES")
        .current_dir(dir.path());
    let out = crate::harness::run_to_end(cmd);
    let all = out.all();
    assert_eq!(out.code, Some(0), "{all}");
    assert!(
        all.contains("namespaces of its own"),
        "skiff says how steps run: {all}"
    );
    assert!(
        all.contains("uid=65534 pid=2"),
        "the step is in a pid namespace: {all}"
    );
    let procs: usize = all
        .split("procs=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a process count");
    assert!(
        procs < 10,
        "only the step's own processes are visible: {all}"
    );
    assert!(all.contains("data: ls: cannot open directory"), "{all}");
    assert!(!all.contains("SQLite format"), "{all}");
    assert!(
        !all.contains("another-run-private"),
        "another run's workspace is out of sight: {all}"
    );
    assert!(
        all.contains("home-ok") && all.contains("output=green"),
        "{all}"
    );
    // The process left behind ended with its step.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.as_slice() == b"sleep\x001234\x00")
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .collect();
    assert!(left.is_empty(), "a process outlived its step: {left:?}");
}

/// Run folders are kept for the next run of the same user only when the run left them exactly as
/// made; whatever a run leaves behind (files, a wider mode) never reaches a later run.
#[test]
fn each_run_gets_its_folders_empty_and_private() {
    assert!(is_root(), "run the tests as root");
    let probe = r#"params:
  mess: { type: boolean, default: false }
steps:
  - run: |
      for d in "$HOME" "$TMPDIR" "$SKIFF_WORKSPACE"; do
        echo "dir $(stat -c %a:%U "$d") entries=$(ls -A "$d" | wc -l)"
      done
      if [ "$SKIFF_PARAM_MESS" = true ]; then
        echo left-behind > "$HOME/left"; mkdir "$TMPDIR/sub"; touch "$SKIFF_WORKSPACE/.hidden"
        chmod 755 "$HOME" "$SKIFF_WORKSPACE"
      fi
"#;
    // One worker: each run takes the uid (and the folders) the one before it gave back.
    let s = Server::start_with(&[("probe", probe)], &[("SKIFF_WORKERS", "1")]);
    let mut users = std::collections::BTreeSet::new();
    for mess in [false, false, true, false, true, true, false, false] {
        let (run, log) = s.run_and_wait("probe", json!({ "mess": mess }));
        assert_eq!(run["status"], "succeeded", "{run}\n{log}");
        let dirs: Vec<&str> = log.lines().filter(|l| l.starts_with("dir ")).collect();
        assert_eq!(dirs.len(), 3, "{log}");
        for line in &dirs {
            let (mode, rest) = line["dir ".len()..].split_once(':').expect("mode:user");
            assert_eq!(mode, "700", "a run's folders are its own alone: {log}");
            assert!(
                rest.ends_with("entries=0"),
                "a run's folders start empty: {log}"
            );
            users.insert(rest.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    assert_eq!(users.len(), 1, "one worker, one uid reused: {users:?}");
    // What the runs left: at most the empty spare folders skiff keeps for its next runs.
    let work = s.data_dir().parent().expect("sandbox").join("work");
    let left: Vec<String> = std::fs::read_dir(&work)
        .expect("the workspaces folder")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| n.starts_with(".spare-")),
        "runs leave nothing behind: {left:?}"
    );
    assert!(
        !left.is_empty(),
        "the last run's folders are kept for the next"
    );
    for name in &left {
        let entries = std::fs::read_dir(work.join(name)).expect("spare").count();
        assert_eq!(entries, 0, "{name} is empty");
    }
}
