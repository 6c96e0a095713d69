//! The README's quick start, followed as written: the example pipelines in a fresh directory,
//! `skiff serve` with every default (the data folder `.skiff` relative to the working directory,
//! no admin token), the sign-in link from its standard error, Run on `hello` from the UI's form,
//! and the commands the README names after it (`login-link`, `token`, `trigger --follow`, `run`).
//! The only change: a free port instead of 8080, so that tests can run side by side.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{DEADLINE, run_to_end};
use crate::harness::{call, raw};

/// `skiff ARGS` in `dir` with none of skiff's variables set, as in a new user's shell.
fn skiff_in(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SKIFF_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Kills the server when the test ends, however it ends.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_quick_start_works_as_written() {
    let home = tempfile::tempdir().expect("tempdir");
    let project = home.path().join("skiff");
    let pipelines = project.join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("mkdir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    for entry in std::fs::read_dir(&examples).expect("the example pipelines") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, pipelines.join(path.file_name().expect("name"))).expect("copy");
    }

    // `cargo run --release -- serve`, on a free port.
    let mut child = skiff_in(&project, &["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skiff serve");
    let stderr = child.stderr.take().expect("stderr");
    let _server = Guard(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[serve] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let until = Instant::now() + DEADLINE;
    let mut lines: Vec<String> = Vec::new();
    let (base, link) = loop {
        let line = rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no sign-in link; saw:\n{}", lines.join("\n")));
        lines.push(line);
        let Some(at) = lines
            .iter()
            .position(|l| l.starts_with("skiff: listening on "))
        else {
            continue;
        };
        // The README: "the second line after `skiff: listening on ...` is a one-time sign-in link".
        if let Some(line) = lines.get(at + 2) {
            let base = lines[at]["skiff: listening on ".len()..]
                .split_whitespace()
                .next()
                .expect("address")
                .to_string();
            let link = line.trim().to_string();
            assert!(
                link.starts_with(&format!("{base}/login/link/")),
                "the second line after `listening on` is the link: {lines:?}"
            );
            break (base, link);
        }
    };

    // Open the link, press Run on `hello`.
    let (status, headers, _) = raw("GET", &link, None, &[]);
    assert_eq!(status, 303, "the sign-in link signs in");
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .and_then(|(_, v)| v.split(';').next())
        .expect("a session cookie")
        .to_string();
    let (status, _, page) = raw(
        "GET",
        &format!("{base}/pipelines/hello"),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!(status, 200);
    let at = page.find("name=\"csrf\" value=\"").expect("the Run form") + 19;
    let csrf = page[at..].split('"').next().expect("csrf").to_string();
    let (status, headers, _) = raw(
        "POST",
        &format!("{base}/pipelines/hello/run"),
        Some(&format!("csrf={csrf}")),
        &[
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(status, 303, "Run leads to the run's page");
    let location = headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .expect("location");
    let id = location.rsplit('/').next().expect("run id").to_string();
    let until = Instant::now() + DEADLINE;
    let run = loop {
        let (status, run) = call(
            "GET",
            &format!("{base}/api/runs/{id}"),
            None,
            &[("cookie", &cookie)],
        );
        assert_eq!(status, 200, "{run}");
        if !matches!(run["status"].as_str(), Some("queued" | "running")) {
            break run;
        }
        assert!(Instant::now() < until, "hello did not finish: {run}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(run["status"], "succeeded", "hello from the UI: {run}");
    assert!(
        project.join(".skiff").join("skiff.db").exists(),
        "the data folder is `.skiff` in the directory skiff was started from"
    );

    // `skiff login-link` names the server's real address.
    let out = run_to_end(skiff_in(&project, &["login-link"]));
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout
            .trim()
            .starts_with(&format!("{base}/login/link/")),
        "login-link points at the running server: {}",
        out.stdout
    );
    let (status, _, _) = raw("GET", out.stdout.trim(), None, &[]);
    assert_eq!(status, 303, "and its link signs in");

    // `export SKIFF_TOKEN=$(skiff token my-laptop)`, then `skiff trigger hello --follow`.
    let out = run_to_end(skiff_in(&project, &["token", "my-laptop"]));
    assert_eq!(out.code, Some(0), "{}", out.all());
    let token = out.stdout.trim().to_string();
    let mut trigger = skiff_in(&project, &["trigger", "hello", "--follow"]);
    trigger.env("SKIFF_TOKEN", &token);
    let out = run_to_end(trigger);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("Hello, world!"), "{}", out.all());

    // `skiff run pipelines/hello.yml --param who=world`, beside the server.
    let out = run_to_end(skiff_in(
        &project,
        &["run", "pipelines/hello.yml", "--param", "who=world"],
    ));
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("greet said: Hello, world"),
        "{}",
        out.all()
    );
}
