//! The distributed deployment for real: a `redis-server`, `skiff serve --redis` and `skiff
//! worker` processes on loopback, driven through the API.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skiff_redis::redis;
use skiff_redis::testing::RedisServer;

use crate::harness::{DEADLINE, Server, scratch, shared_file};

/// A `skiff worker` process.
pub struct Worker {
    child: Child,
    pub name: String,
    _dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    pub fn start(redis: &str, name: &str, labels: &str, env: &[(&str, &str)]) -> Worker {
        let dir = scratch();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
        cmd.args(["worker", "--name", name, "--labels", labels])
            .env("SKIFF_REDIS", redis)
            .env("SKIFF_WORKSPACES", dir.path().join("work"))
            .env("SKIFF_KILL_GRACE", "2s")
            .env_remove("SKIFF_SECRETS_FILE")
            .env_remove("SKIFF_DATA")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start skiff worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                let _ = tx.send(line);
            }
        });
        let mut worker = Worker {
            child,
            name: name.to_string(),
            _dir: dir,
            lines: rx,
        };
        worker.wait_for_line(&format!("worker {name} takes runs"));
        worker
    }

    /// Waits for a line of its output holding `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            match self
                .lines
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("worker {} never printed {needle:?}", self.name),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + DEADLINE;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!(
            "worker {} did not stop within {DEADLINE:?} of SIGTERM",
            self.name
        );
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(redis: &RedisServer, pipelines: &[(&str, &str)], env: &[(&str, &str)]) -> Server {
    let url = redis.url();
    let mut all = vec![("SKIFF_REDIS", url.as_str()), ("SKIFF_WORKERS", "1")];
    all.extend_from_slice(env);
    Server::start_with(pipelines, &all)
}

fn run(server: &Server, id: &str) -> Value {
    let (status, run) = server.api("GET", &format!("/api/runs/{id}"), None);
    assert_eq!(status, 200, "{run}");
    run
}

/// Waits until the run satisfies `done`; returns it.
fn wait_run(server: &Server, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + DEADLINE;
    loop {
        let r = run(server, id);
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < until, "run {id} never {what}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ended(r: &Value) -> bool {
    matches!(
        r["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

#[test]
fn runs_go_to_the_workers_whose_labels_they_need() {
    let redis = RedisServer::start();
    let server = serve(
        &redis,
        &[
            ("on-gpu", "runs_on: [gpu]\nsteps:\n  - run: echo on gpu\n"),
            (
                "on-arm",
                "runs_on: [arm, linux]\nsteps:\n  - run: echo on arm\n",
            ),
            ("on-aws", "runs_on: [aws]\nsteps:\n  - run: echo never\n"),
            ("anywhere", "steps:\n  - run: echo anywhere\n"),
        ],
        &[],
    );
    let _gpu = Worker::start(&redis.url(), "w-gpu", "gpu", &[]);
    let _arm = Worker::start(&redis.url(), "w-arm", "linux,arm", &[]);
    for (pipeline, worker) in [("on-gpu", "w-gpu"), ("on-arm", "w-arm")] {
        for _ in 0..3 {
            let (r, log) = server.run_and_wait(pipeline, json!({}));
            assert_eq!(r["status"], "succeeded", "{r}\n{log}");
            assert_eq!(r["worker"], worker, "{r}");
        }
    }
    let (r, _) = server.run_and_wait("anywhere", json!({}));
    assert_eq!(r["status"], "succeeded", "{r}");
    // The workers' metrics reach the server's /metrics through Redis (a worker serves no HTTP),
    // labelled with the worker, in a document promtool accepts.
    let until = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (_, _, text) = crate::harness::raw(
            "GET",
            &server.url("/metrics"),
            None,
            &[(
                "authorization",
                &format!("Bearer {}", crate::harness::ADMIN_TOKEN),
            )],
        );
        if text.contains("skiff_runs_finished_total{worker=\"w-gpu\"")
            && text.contains("skiff_runs_finished_total{worker=\"w-arm\"")
        {
            break text;
        }
        assert!(
            Instant::now() < until,
            "no worker metrics on /metrics:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (ok, out) = crate::edge::tool(
        "promtool",
        &["check", "metrics"],
        Some(&text),
        "Debian's prometheus",
    );
    assert!(ok, "promtool: {out}\n{text}");
    // No worker has `aws`: the run waits, and says for what.
    let id = server.trigger("on-aws", json!({}));
    std::thread::sleep(Duration::from_millis(500));
    let r = run(&server, &id);
    assert_eq!(r["status"], "queued", "{r}");
    let (status, workers) = server.api("GET", "/api/workers", None);
    assert_eq!(status, 200, "{workers}");
    let names: Vec<&str> = workers["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert!(
        names.contains(&"w-gpu") && names.contains(&"w-arm"),
        "{workers}"
    );
    assert_eq!(
        names.len(),
        3,
        "two workers and the server's own: {workers}"
    );
    let (status, page) = server.api("GET", &format!("/api/runs/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(
        page["waiting_for"], "a worker with labels aws",
        "a run no live worker can take says so: {page}"
    );
}

#[test]
fn a_remote_workers_log_is_live_and_a_cancel_reaches_it() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let marker = scratch.path().join("finally");
    shared_file(&marker);
    let reached = scratch.path().join("reached");
    shared_file(&reached);
    let server = serve(
        &redis,
        &[(
            "slow",
            &format!(
                "runs_on: [far]\nsteps:\n  - run: |\n      trap 'echo \"$EPOCHREALTIME\" >> {r}; exit 1' TERM\n      echo started\n      sleep 30 & wait\nfinally:\n  - run: echo done >> {m}\n",
                r = reached.display(),
                m = marker.display()
            ),
        )],
        &[],
    );
    let _far = Worker::start(&redis.url(), "w-far", "far", &[]);
    let id = server.trigger("slow", json!({}));
    server.wait_for_log(&id, "started");
    assert_eq!(run(&server, &id)["status"], "running");
    let asked = Instant::now();
    let asked_at = epoch();
    let (status, body) = server.api("POST", &format!("/api/runs/{id}/cancel"), None);
    assert!(status == 202 || status == 200, "{status} {body}");
    let r = wait_run(&server, &id, "ended", ended);
    let took = asked.elapsed();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["worker"], "w-far");
    // The step on the other process got its SIGTERM within a second of the request.
    let got: f64 = std::fs::read_to_string(&reached)
        .expect("reached")
        .trim()
        .parse()
        .expect("the step's trap wrote the time");
    assert!(
        got - asked_at < 1.0,
        "the cancel reached the step {:.3} s after it was asked",
        got - asked_at
    );
    assert!(took < Duration::from_secs(4), "the cancel took {took:?}");
    assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "done\n");
}

#[test]
fn a_killed_workers_run_fails_as_lost_and_its_finally_runs_elsewhere() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let main_marker = scratch.path().join("main");
    let fin_marker = scratch.path().join("finally");
    shared_file(&main_marker);
    shared_file(&fin_marker);
    let lease = [("SKIFF_LEASE", "1500ms")];
    let server = serve(
        &redis,
        &[(
            "deploy",
            &format!(
                "runs_on: [site]\nsteps:\n  - run: echo $SKIFF_RUN_ID >> {m}; echo started; sleep 60\nfinally:\n  - run: echo $SKIFF_RUN_ID >> {f}\n",
                m = main_marker.display(),
                f = fin_marker.display()
            ),
        )],
        &lease,
    );
    let mut doomed = Worker::start(&redis.url(), "w-doomed", "site", &lease);
    let id = server.trigger("deploy", json!({}));
    server.wait_for_log(&id, "started");
    assert_eq!(run(&server, &id)["worker"], "w-doomed");
    let _heir = Worker::start(&redis.url(), "w-heir", "site", &lease);
    doomed.kill();
    let killed = Instant::now();
    let r = wait_run(&server, &id, "ended", ended);
    let noticed = killed.elapsed();
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["reason"].as_str().is_some_and(|s| s.contains("worker")),
        "the reason says the worker was lost: {r}"
    );
    assert!(
        noticed < Duration::from_millis(1500) + Duration::from_secs(3),
        "the lost worker's run ended {noticed:?} after the kill (lease 1.5 s)"
    );
    let lines = |p: &Path| std::fs::read_to_string(p).expect("marker");
    assert_eq!(
        lines(&main_marker).lines().count(),
        1,
        "the main step ran once"
    );
    assert_eq!(
        lines(&fin_marker).lines().count(),
        1,
        "finally ran once, elsewhere"
    );
    let (status, workers) = server.api("GET", "/api/workers", None);
    assert_eq!(status, 200);
    let doomed = listed_worker(&workers, "w-doomed").expect("the killed worker is still listed");
    assert_eq!(doomed["lost"], true, "{doomed}");
}

#[test]
fn a_stopped_worker_finishes_or_cancels_its_runs_and_leaves() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let marker = scratch.path().join("finally");
    shared_file(&marker);
    let server = serve(
        &redis,
        &[(
            "long",
            &format!(
                "runs_on: [term]\nsteps:\n  - run: echo started; sleep 60\nfinally:\n  - run: echo cleaned >> {}\n",
                marker.display()
            ),
        )],
        &[],
    );
    let mut w = Worker::start(&redis.url(), "w-term", "term", &[("SKIFF_STOP_WAIT", "1s")]);
    let id = server.trigger("long", json!({}));
    server.wait_for_log(&id, "started");
    assert_eq!(w.terminate(), Some(0));
    let r = run(&server, &id);
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        "cleaned\n"
    );
    let (_, workers) = server.api("GET", "/api/workers", None);
    assert!(
        listed_worker(&workers, "w-term").is_none(),
        "a worker that stopped cleanly leaves the registry: {workers}"
    );
    // A run queued after it left waits for the next worker with the label.
    let next = server.trigger("long", json!({}));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run(&server, &next)["status"], "queued");
}

#[test]
fn two_servers_on_one_redis_serve_the_same_runs_and_tokens() {
    let redis = RedisServer::start();
    let pipelines = [("hello", "steps:\n  - run: echo hello\n")];
    let a = serve(&redis, &pipelines, &[]);
    let b = serve(&redis, &pipelines, &[]);
    let (r, _) = a.run_and_wait("hello", json!({}));
    assert_eq!(r["status"], "succeeded", "{r}");
    let id = r["id"].as_str().expect("id");
    assert_eq!(run(&b, id)["status"], "succeeded");
    let (status, token) = a.api(
        "POST",
        "/api/tokens",
        Some(&json!({"name": "ci", "scope": "run"}).to_string()),
    );
    assert_eq!(status, 201, "{token}");
    let secret = token["token"].as_str().expect("token");
    let (status, _) = crate::harness::call(
        "GET",
        &b.url("/api/runs"),
        None,
        &[("authorization", &format!("Bearer {secret}"))],
    );
    assert_eq!(status, 200, "a token made on one server works on the other");
    // A run started on one is followed live on the other.
    let id = b.trigger("hello", json!({}));
    let r = a.wait_for_end(&id);
    assert_eq!(r["status"], "succeeded", "{r}");
    // Password guesses spread over both servers count together.
    let guess = |s: &Server| {
        crate::harness::raw(
            "POST",
            &s.url("/login"),
            Some("password=not-the-password"),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .0
    };
    for i in 0..skiff_server::auth::GUESSES_ALLOWED {
        let status = guess(if i % 2 == 0 { &a } else { &b });
        assert_eq!(status, 401, "guess {i} is checked");
    }
    assert_eq!(guess(&a), 429, "the next guess is refused on one server");
    assert_eq!(guess(&b), 429, "and on the other");
}

#[test]
fn queued_runs_outlive_a_redis_restart() {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let server = serve(
        &redis,
        &[("later", "runs_on: [later]\nsteps:\n  - run: echo ran\n")],
        &[],
    );
    let ids: Vec<String> = (0..5).map(|_| server.trigger("later", json!({}))).collect();
    // A graceful restart: SHUTDOWN writes the AOF out; the server comes back on the same files.
    let redis = redis.restart();
    let _w = Worker::start(&redis.url(), "w-later", "later", &[]);
    for id in &ids {
        let r = wait_run(&server, id, "ended", ended);
        assert_eq!(r["status"], "succeeded", "{r}");
    }
}

/// Redis ACL users as the deployment files make them: the server's sees every skiff key, the
/// workers' only `skiff:d:*`.
fn acl_users(redis: &RedisServer) {
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-s", redis.socket().to_str().expect("path")])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for line in skiff_redis::acl::users("server-secret", "worker-secret") {
        let args: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cli(&args), "OK", "{line}");
    }
    assert_eq!(cli(&["ACL", "SETUSER", "default", "off"]), "OK");
}

#[test]
fn a_workers_redis_user_cannot_reach_credentials() {
    let redis = RedisServer::start();
    acl_users(&redis);
    let base = redis.url();
    let server_url = format!("{base}?user=skiff-server");
    let worker_url = base + "?user=skiff-worker";
    // The step tries what a hostile build would: the worker's credential in its environment,
    // in any process's environment it can read, and Redis itself through the worker's socket.
    // (Read with bash builtins only, the needle built at run time: no process of the probe's
    // own carries it.)
    let probe = "runs_on: [acl]\nsteps:\n  - run: |\n      echo hello\n      needle=$(printf 'worker-%s' secret)\n      [[ \"$(env)\" == *\"$needle\"* ]] && echo LEAK-ENV\n      for p in /proc/[0-9]*; do for f in environ cmdline; do\n        [[ -r $p/$f ]] || continue\n        text=$( (tr '\\0' ' ' < $p/$f) 2>/dev/null )\n        [[ $text == *\"$needle\"* ]] && echo LEAK-$f $p\n      done; done\n      true\n";
    let server = Server::start_with(
        &[("hello", probe)],
        &[
            ("SKIFF_REDIS", &server_url),
            ("SKIFF_REDIS_PASSWORD", "server-secret"),
            ("SKIFF_WORKERS", "1"),
        ],
    );
    let _w = Worker::start(
        &worker_url,
        "w-acl",
        "acl",
        &[("SKIFF_REDIS_PASSWORD", "worker-secret")],
    );
    let (r, log) = server.run_and_wait("hello", json!({}));
    assert_eq!(r["status"], "succeeded", "{r}\n{log}");
    assert_eq!(r["worker"], "w-acl");
    assert!(log.contains("hello"), "{log}");
    assert!(
        !log.contains("LEAK"),
        "a step reached the worker's Redis password: {log}"
    );
    // What an attacker holding the worker's credential gets: no credentials.
    let socket = redis.socket().to_str().expect("path").to_string();
    let as_worker = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args([
                "-s",
                &socket,
                "--user",
                "skiff-worker",
                "--pass",
                "worker-secret",
            ])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    for args in [
        vec!["KEYS", "skiff:auth:*"],
        vec!["GET", "skiff:auth:password"],
        vec!["HGETALL", "skiff:auth:sessions"],
        vec!["SCAN", "0", "MATCH", "skiff:auth:*"],
        vec!["ACL", "LIST"],
        vec!["CONFIG", "GET", "*"],
    ] {
        let out = as_worker(&args);
        assert!(
            out.contains("NOPERM")
                || out.contains("no permissions")
                || out.trim().is_empty() && args[0] == "SCAN",
            "{args:?} as the worker: {out}"
        );
    }
}

/// What the chaos tests' steps wrote: per run, when (epoch seconds) its main step and its
/// finally step started and ended.
#[derive(Default, Debug)]
struct Marks {
    main_start: Vec<f64>,
    main_end: Vec<f64>,
    fin_start: Vec<f64>,
    fin_end: Vec<f64>,
}

fn marks(path: &Path) -> std::collections::HashMap<String, Marks> {
    let mut out: std::collections::HashMap<String, Marks> = Default::default();
    for line in std::fs::read_to_string(path).expect("marks").lines() {
        let mut words = line.split_whitespace();
        let (Some(run), Some(what), Some(at)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Ok(at) = at.parse::<f64>() else { continue };
        let m = out.entry(run.to_string()).or_default();
        match what {
            "main-start" => m.main_start.push(at),
            "main-end" => m.main_end.push(at),
            "fin-start" => m.fin_start.push(at),
            "fin-end" => m.fin_end.push(at),
            _ => {}
        }
    }
    out
}

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A pipeline whose main and finally steps write their starts and ends to `marks` (one line
/// each, appended whole, with the time), each taking a random part of half a second.
fn chaos_pipeline(marks: &Path, runs_on: &str) -> String {
    let m = marks.display();
    format!(
        "{runs_on}steps:\n  - run: |\n      echo \"$SKIFF_RUN_ID main-start $EPOCHREALTIME\" >> {m}\n      sleep 0.$((RANDOM % 5))\n      echo \"$SKIFF_RUN_ID main-end $EPOCHREALTIME\" >> {m}\nfinally:\n  - run: |\n      echo \"$SKIFF_RUN_ID fin-start $EPOCHREALTIME\" >> {m}\n      sleep 0.$((RANDOM % 3))\n      echo \"$SKIFF_RUN_ID fin-end $EPOCHREALTIME\" >> {m}\n"
    )
}

/// The promises a chaos test checks: every run ended; no main step started twice; every run
/// whose main step started ran its finally step to its end, and started it again only where a
/// worker was killed between the two starts.
fn check_chaos(server: &Server, ids: &[String], marks_file: &Path, kills: &[f64]) {
    let until = Instant::now() + Duration::from_secs(120);
    for id in ids {
        loop {
            let r = run(server, id);
            if ended(&r) {
                break;
            }
            assert!(Instant::now() < until, "run {id} never ended: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A step of a killed worker may still be writing its last line.
    std::thread::sleep(Duration::from_millis(600));
    let marks = marks(marks_file);
    let mut again = 0;
    for id in ids {
        let r = run(server, id);
        let Some(m) = marks.get(id) else {
            continue;
        };
        assert!(
            m.main_start.len() <= 1,
            "run {id}'s main step started twice: {m:?} {r}"
        );
        if !m.main_start.is_empty() {
            assert!(
                !m.fin_end.is_empty(),
                "run {id} started but its finally never ended: {m:?} {r}"
            );
        }
        for pair in m.fin_start.windows(2) {
            // A step's mark is written by its shell a moment after the step started: one started
            // just before a kill writes its mark just after it (seen: 2.3 ms after).
            const SHELL_START: f64 = 0.05;
            assert!(
                kills
                    .iter()
                    .any(|k| *k >= pair[0] - SHELL_START && *k <= pair[1]),
                "run {id}'s finally started again with no kill in between: {m:?}, kills {kills:?}"
            );
            again += 1;
        }
    }
    eprintln!(
        "chaos: {} runs ended, {} of them started, {again} finally starts repeated after a kill, {} kills",
        ids.len(),
        marks.len(),
        kills.len()
    );
    assert!(
        marks.len() >= ids.len() / 2,
        "most runs started: {}",
        marks.len()
    );
}

#[test]
fn workers_killed_at_random_lose_no_run_and_run_no_main_step_twice() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let marks_file = scratch.path().join("marks");
    shared_file(&marks_file);
    let lease = [("SKIFF_LEASE", "1s")];
    let server = serve(
        &redis,
        &[("chaos", &chaos_pipeline(&marks_file, "runs_on: [chaos]\n"))],
        &lease,
    );
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| Worker::start(&redis.url(), &format!("c{i}"), "chaos", &lease))
        .collect();
    let ids: Vec<String> = (0..36)
        .map(|_| server.trigger("chaos", json!({})))
        .collect();
    // Kill a worker every 200 to 600 ms, 8 times, each replaced by a new one.
    let mut seed = u64::from(std::process::id());
    let mut kills = Vec::new();
    for next in 3..11 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(200 + (seed >> 33) % 400));
        let victim = (seed >> 40) as usize % workers.len();
        kills.push(epoch());
        workers[victim].kill();
        workers.remove(victim);
        workers.push(Worker::start(
            &redis.url(),
            &format!("c{next}"),
            "chaos",
            &lease,
        ));
    }
    check_chaos(&server, &ids, &marks_file, &kills);
}

#[test]
fn an_embedded_server_killed_at_random_loses_no_run_and_runs_no_main_step_twice() {
    let scratch = scratch();
    let marks_file = scratch.path().join("marks");
    shared_file(&marks_file);
    let mut server = Server::start_with(
        &[("chaos", &chaos_pipeline(&marks_file, ""))],
        &[("SKIFF_LEASE", "1s"), ("SKIFF_WORKERS", "3")],
    );
    let ids: Vec<String> = (0..30)
        .map(|_| server.trigger("chaos", json!({})))
        .collect();
    let mut seed = u64::from(std::process::id());
    let mut kills = Vec::new();
    for _ in 0..4 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(300 + (seed >> 33) % 500));
        kills.push(epoch());
        server.crash();
        server = server.restart();
    }
    check_chaos(&server, &ids, &marks_file, &kills);
}

#[test]
fn a_worker_reaches_redis_over_tls() {
    let redis = RedisServer::start_tls();
    // A server without in-process workers: a run without `runs_on` goes to the worker.
    let server = Server::start_with(
        &[("hello", "steps:\n  - run: echo over tls\n")],
        &[("SKIFF_REDIS", &redis.url()), ("SKIFF_WORKERS", "0")],
    );
    let ca = redis.ca_file().expect("ca");
    let url = redis.tls_url().expect("tls url");
    let _w = Worker::start(
        &url,
        "w-tls",
        "tls",
        &[("SKIFF_REDIS_CA_FILE", ca.to_str().expect("path"))],
    );
    let (r, log) = server.run_and_wait("hello", json!({}));
    assert_eq!(r["status"], "succeeded", "{r}\n{log}");
    assert_eq!(r["worker"], "w-tls");
    assert!(log.contains("over tls"), "{log}");
}

#[test]
fn a_run_claimed_by_a_worker_that_died_before_starting_it_runs_once_elsewhere() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let marker = scratch.path().join("ran");
    shared_file(&marker);
    let server = serve(
        &redis,
        &[(
            "once",
            &format!(
                "runs_on: [ghostly]\nsteps:\n  - run: echo $SKIFF_RUN_ID >> {}\n",
                marker.display()
            ),
        )],
        &[],
    );
    let id = server.trigger("once", json!({}));
    // A worker takes the job and claims the run, then dies before its first step: its claim is
    // left to run out, its job gone from the list.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use skiff_core::store::Store;
        let store = skiff_redis::RedisStore::connect(&skiff_redis::RedisConfig::new(redis.url()))
            .await
            .expect("store");
        let run_id: skiff_core::run::RunId = id.parse().expect("id");
        store
            .claim_run(&run_id, "ghost", Duration::from_millis(500))
            .await
            .expect("the ghost claims it");
        let client = redis::Client::open(redis.url()).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: Option<String> = redis::cmd("LPOP")
            .arg("skiff:d:q:v1:ghostly")
            .query_async(&mut conn)
            .await
            .expect("take the job");
    });
    assert_eq!(run(&server, &id)["worker"], "ghost");
    let _w = Worker::start(&redis.url(), "w-alive", "ghostly", &[("SKIFF_LEASE", "1s")]);
    let r = wait_run(&server, &id, "ended", ended);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["worker"], "w-alive");
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("marker")
            .lines()
            .count(),
        1,
        "it ran once"
    );
}

#[test]
fn a_job_delivered_twice_runs_its_run_once_and_a_slow_redis_kills_no_worker() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let marker = scratch.path().join("ran");
    shared_file(&marker);
    let server = serve(
        &redis,
        &[(
            "twice",
            &format!(
                "runs_on: [dup]\nsteps:\n  - run: echo $SKIFF_RUN_ID >> {}; sleep 0.3\n",
                marker.display()
            ),
        )],
        &[],
    );
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-s", redis.socket().to_str().expect("path")])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Three runs whose jobs are each on the list twice (a job given back, a sweeper's copy).
    let ids: Vec<String> = (0..3).map(|_| server.trigger("twice", json!({}))).collect();
    let jobs = cli(&["LRANGE", "skiff:d:q:v1:dup", "0", "-1"]);
    for job in jobs.lines() {
        cli(&["RPUSH", "skiff:d:q:v1:dup", job]);
    }
    assert_eq!(cli(&["LLEN", "skiff:d:q:v1:dup"]), "6");
    let _a = Worker::start(&redis.url(), "w-dup-a", "dup", &[]);
    let _b = Worker::start(&redis.url(), "w-dup-b", "dup", &[]);
    // Redis answers nothing for 2 s (stopped) while the runs go on: the workers wait, and
    // carry on.
    let pid = redis.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    for id in &ids {
        let r = wait_run(&server, id, "ended", ended);
        assert_eq!(r["status"], "succeeded", "{r}");
    }
    let ran = std::fs::read_to_string(&marker).expect("marker");
    for id in &ids {
        assert_eq!(
            ran.lines().filter(|l| l == id).count(),
            1,
            "{id} ran once: {ran}"
        );
    }
    let again = server.trigger("twice", json!({}));
    let r = wait_run(&server, &again, "ended", ended);
    assert_eq!(
        r["status"], "succeeded",
        "the workers still take runs after the slow answer: {r}"
    );
}

#[test]
fn login_links_and_tokens_are_made_on_redis_from_the_command_line() {
    let redis = RedisServer::start();
    let server = serve(&redis, &[("hello", "steps:\n  - run: echo hi\n")], &[]);
    let sb = crate::harness::Sandbox::new();
    let out = sb.run(&["token", "ci", "--scope", "read", "--redis", &redis.url()]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let secret = out.stdout.trim();
    let (status, _) = crate::harness::call(
        "GET",
        &server.url("/api/runs"),
        None,
        &[("authorization", &format!("Bearer {secret}"))],
    );
    assert_eq!(status, 200, "a token made with --redis works on the server");
    let out = sb.run(&[
        "login-link",
        "--redis",
        &redis.url(),
        "--public-url",
        &server.base,
    ]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let link = out.stdout.trim();
    let (status, headers, _) = crate::harness::raw("GET", link, None, &[]);
    assert_eq!(status, 303, "the link signs in");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "set-cookie" && v.contains("skiff_session")),
        "{headers:?}"
    );
}

#[test]
fn a_run_goes_only_to_a_worker_holding_the_secrets_its_steps_use() {
    let redis = RedisServer::start();
    let server = Server::start_with(
        &[(
            "deploy",
            "steps:\n  - run: test -n \"$KEY\" && echo key held\n    env:\n      KEY: ${{ secrets.DEPLOY_KEY }}\n",
        )],
        &[("SKIFF_REDIS", &redis.url()), ("SKIFF_WORKERS", "0")],
    );
    let _without = Worker::start(&redis.url(), "w-plain", "", &[]);
    let id = server.trigger("deploy", json!({}));
    std::thread::sleep(Duration::from_millis(500));
    let r = run(&server, &id);
    assert_eq!(
        r["status"], "queued",
        "a worker without the secret leaves it: {r}"
    );
    assert_eq!(
        r["waiting_for"], "a worker holding the secrets DEPLOY_KEY",
        "{r}"
    );
    let _holder = Worker::start(
        &redis.url(),
        "w-keyed",
        "",
        &[("SKIFF_SECRET_DEPLOY_KEY", "s3cret-value")],
    );
    let r = wait_run(&server, &id, "ended", ended);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["worker"], "w-keyed");
    let (_, workers) = server.api("GET", "/api/workers", None);
    let keyed = listed_worker(&workers, "w-keyed").expect("listed");
    assert_eq!(
        keyed["secrets"],
        json!(["DEPLOY_KEY"]),
        "names, never values: {keyed}"
    );
    assert!(!workers.to_string().contains("s3cret-value"));
}

/// Runs of one concurrency group, spread over two workers (and an embedded server's workers),
/// run one at a time, in order, `finally` included; a held run says whom it waits for.
fn check_group_runs_one_at_a_time(server: &Server, marks: &Path) {
    let ids: Vec<String> = (0..4)
        .map(|_| server.trigger("deploy", json!({})))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let last = run(server, &ids[3]);
    assert_eq!(last["held"], true, "{last}");
    assert_eq!(last["group"], "app-deploy");
    assert!(
        last["waiting_for"]
            .as_str()
            .is_some_and(|w| w.starts_with("deploy #") && w.ends_with(" of group app-deploy")),
        "{last}"
    );
    for id in &ids {
        let r = wait_run(server, id, "ended", ended);
        assert_eq!(r["status"], "succeeded", "{r}");
    }
    let lines: Vec<String> = std::fs::read_to_string(marks)
        .expect("marks")
        .lines()
        .map(str::to_string)
        .collect();
    let mut expected = Vec::new();
    for id in &ids {
        expected.push(format!("{id} start"));
        expected.push(format!("{id} finally"));
    }
    assert_eq!(
        lines, expected,
        "one run of the group at a time, in order, finally included"
    );
}

fn group_pipeline(marks: &Path, runs_on: &str) -> String {
    format!(
        "{runs_on}concurrency: app-${{{{ params.what }}}}\nparams:\n  what: {{ default: deploy }}\nsteps:\n  - run: echo \"$SKIFF_RUN_ID start\" >> {m}; sleep 0.3\nfinally:\n  - run: sleep 0.2; echo \"$SKIFF_RUN_ID finally\" >> {m}\n",
        m = marks.display()
    )
}

#[test]
fn a_concurrency_group_runs_one_at_a_time_across_workers() {
    let redis = RedisServer::start();
    let scratch = scratch();
    let marks = scratch.path().join("marks");
    shared_file(&marks);
    let server = Server::start_with(
        &[("deploy", &group_pipeline(&marks, "runs_on: [grp]\n"))],
        &[("SKIFF_REDIS", &redis.url()), ("SKIFF_WORKERS", "0")],
    );
    let _a = Worker::start(&redis.url(), "w-g1", "grp", &[]);
    let _b = Worker::start(&redis.url(), "w-g2", "grp", &[]);
    check_group_runs_one_at_a_time(&server, &marks);
}

#[test]
fn a_concurrency_group_runs_one_at_a_time_embedded() {
    let scratch = scratch();
    let marks = scratch.path().join("marks");
    shared_file(&marks);
    let server = Server::start_with(
        &[("deploy", &group_pipeline(&marks, ""))],
        &[("SKIFF_WORKERS", "3")],
    );
    check_group_runs_one_at_a_time(&server, &marks);
}

/// The worker named `name` in an answer of `GET /api/workers`, if it is listed.
fn listed_worker(workers: &Value, name: &str) -> Option<Value> {
    workers["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["name"] == name)
        .cloned()
}
