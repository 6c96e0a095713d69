//! The one test harness: the real `skiff` binary in a temporary folder, driven through its CLI
//! ([`Sandbox`]) and its HTTP API ([`Server`]) only, every wait bounded by [`DEADLINE`].

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any wait of a test lasts (a command to end, a server to start or stop, a log
/// line, a condition to become true); a test that would wait longer fails, naming what it
/// waited for.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub const ADMIN_TOKEN: &str = "it-admin-token-0123456789";

/// An empty file that steps of several runs (each a user of its own) may all append to.
pub fn shared_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, "").expect("create a shared file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
}

/// A temporary folder that steps can write into whatever user they run as (mode 1777, like
/// /tmp): skiff's data folder inside it stays skiff's own (0700).
pub fn scratch() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod the scratch folder");
    dir
}

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox { dir: scratch() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// A server on this sandbox's data folder: how a test reads what `skiff run` recorded.
    pub fn serve(&self) -> Server {
        std::fs::create_dir_all(self.path().join("pipelines")).expect("mkdir");
        Server::spawn(Dir::At(self.path().to_path_buf()), &[])
    }

    /// The newest run in this sandbox's data folder as the API shows it (with its steps) and
    /// its log, read through a server started for the purpose.
    pub fn last_run(&self) -> (Value, String) {
        let s = self.serve();
        let (status, page) = s.api("GET", "/api/runs?limit=1", None);
        assert_eq!(status, 200, "{page}");
        let id = page["runs"][0]["id"].as_str().expect("a run").to_string();
        let (status, run) = s.api("GET", &format!("/api/runs/{id}"), None);
        assert_eq!(status, 200, "{run}");
        (run, s.log_text(&id))
    }

    /// Writes a pipeline file and returns its path.
    pub fn pipeline(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.path().join(format!("{name}.yml"));
        std::fs::write(&path, yaml).expect("write pipeline");
        path
    }

    /// `skiff ARGS` with the data folder set and a clean environment for skiff's own variables.
    pub fn skiff(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
        cmd.args(args)
            .env("SKIFF_DATA", self.data())
            .env("SKIFF_WORKSPACES", self.path().join("work"))
            .env("SKIFF_KILL_GRACE", "2s")
            .env_remove("SKIFF_SECRETS_FILE")
            .env("NO_COLOR", "1")
            .current_dir(self.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `skiff ARGS` to its end (killed at the deadline).
    pub fn run(&self, args: &[&str]) -> Out {
        run_to_end(self.skiff(args))
    }
}

#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl From<Output> for Out {
    fn from(o: Output) -> Self {
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn run_to_end(mut cmd: Command) -> Out {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skiff");
    wait_with_deadline(child)
}

pub fn wait_with_deadline(child: Child) -> Out {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for skiff").into(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("skiff did not finish within {DEADLINE:?}");
        }
    }
}

/// A running `skiff` whose stdout is read line by line, to wait for events in its output.
pub struct Live {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Live {
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start skiff");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Live {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} in time; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for the end; returns the exit code and the rest of the output.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let rest: Vec<String> = self.lines.iter().collect();
                self.seen.extend(rest);
                return (status.code(), self.seen.join("\n"));
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "skiff did not finish in time; saw:\n{}",
                    self.seen.join("\n")
                );
            }
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a process with this pid is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Reads pids written one per line into a file.
pub fn pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits (bounded) until none of `pids` is alive; false if some still are.
pub fn all_gone(pids: &[i32]) -> bool {
    let until = Instant::now() + DEADLINE;
    while Instant::now() < until {
        if pids.iter().all(|p| !alive(*p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A server's folder: its own temporary one, or a sandbox's (to read what `skiff run` left).
enum Dir {
    Owned(tempfile::TempDir),
    At(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Owned(d) => d.path(),
            Dir::At(p) => p,
        }
    }
}

pub struct Server {
    child: Child,
    pub base: String,
    /// `--hooks-listen`'s address (`http://ADDR`), when the server was given one.
    pub hooks_base: Option<String>,
    pub login_link: String,
    dir: Dir,
    env: Vec<(String, String)>,
}

impl Server {
    /// Starts `skiff serve` with `pipelines` (name, yaml) in its pipelines folder.
    pub fn start(pipelines: &[(&str, &str)]) -> Server {
        Self::start_with(pipelines, &[])
    }

    pub fn start_with(pipelines: &[(&str, &str)], extra_env: &[(&str, &str)]) -> Server {
        let dir = scratch();
        let pdir = dir.path().join("pipelines");
        std::fs::create_dir(&pdir).expect("mkdir");
        let dir = Dir::Owned(dir);
        for (name, yaml) in pipelines {
            std::fs::write(pdir.join(format!("{name}.yml")), yaml).expect("write pipeline");
        }
        Self::spawn(dir, extra_env)
    }

    /// Kills the server with SIGKILL.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if !self.terminate() {
            let _ = self.child.kill();
            panic!("skiff serve did not stop within {DEADLINE:?} of SIGTERM");
        }
    }

    /// Sends SIGTERM; whether the server exited within the deadline.
    fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + DEADLINE;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The run's whole log as text, as the API pages it.
    pub fn log_text(&self, id: &str) -> String {
        let (status, log) = self.api("GET", &format!("/api/runs/{id}/logs"), None);
        assert_eq!(status, 200, "{log}");
        log["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .filter_map(|c| c["text"].as_str())
            .collect()
    }

    /// Starts a run and follows it to its end: the run as the API shows it, and its log.
    pub fn run_and_wait(&self, pipeline: &str, params: Value) -> (Value, String) {
        let id = self.trigger(pipeline, params);
        let run = self.wait_for_end(&id);
        (run, self.log_text(&id))
    }

    /// Follows a run to its end and returns it as the API shows it, with its steps.
    pub fn wait_for_end(&self, id: &str) -> Value {
        self.follow(id, None);
        let (status, run) = self.api("GET", &format!("/api/runs/{id}"), None);
        assert_eq!(status, 200, "{run}");
        run
    }

    /// Starts the server again on the same data (after `crash` or `stop`).
    pub fn restart(self) -> Server {
        self.restart_with(&[])
    }

    /// Starts the server again on the same data, with more environment variables.
    pub fn restart_with(mut self, extra_env: &[(&str, &str)]) -> Server {
        let dir = std::mem::replace(&mut self.dir, Dir::At(PathBuf::new()));
        let env = std::mem::take(&mut self.env);
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra_env.iter().copied())
            .collect();
        Self::spawn(dir, &env)
    }

    fn spawn(dir: Dir, extra_env: &[(&str, &str)]) -> Server {
        let pdir = dir.path().join("pipelines");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--reload-every",
            "100ms",
        ])
        .env("SKIFF_PIPELINES", &pdir)
        .env("SKIFF_DATA", dir.path().join("data"))
        .env("SKIFF_WORKSPACES", dir.path().join("work"))
        .env("SKIFF_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SKIFF_KILL_GRACE", "2s")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        // An empty value removes the variable (the admin token, say).
        for (k, v) in extra_env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().expect("start skiff serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                let _ = tx.send(line);
            }
        });
        let until = Instant::now() + DEADLINE;
        let (mut base, mut link, mut hooks_base) = (None, None, None);
        while base.is_none() || link.is_none() {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("skiff: webhooks on ") {
                        hooks_base = rest
                            .split_whitespace()
                            .next()
                            .and_then(|u| u.strip_suffix("/hooks/ID"))
                            .map(str::to_string);
                    } else if let Some(rest) = line.strip_prefix("skiff: listening on ") {
                        base = rest.split_whitespace().next().map(str::to_string);
                    } else if line.contains("/login/link/") {
                        link = Some(line.trim().to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("skiff serve did not print its address and login link in time");
                }
            }
        }
        Server {
            child,
            base: base.unwrap_or_default(),
            hooks_base,
            login_link: link.unwrap_or_default(),
            dir,
            env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn pipelines_dir(&self) -> PathBuf {
        self.dir.path().join("pipelines")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An API call as the admin token.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        call(
            method,
            &self.url(path),
            body,
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
    }

    /// Starts a run and returns its id.
    pub fn trigger(&self, pipeline: &str, params: Value) -> String {
        let body = serde_json::json!({ "params": params }).to_string();
        let (status, run) = self.api(
            "POST",
            &format!("/api/pipelines/{pipeline}/runs"),
            Some(&body),
        );
        assert_eq!(status, 201, "{run}");
        run["id"].as_str().expect("id").to_string()
    }

    /// Follows the run's event stream until a log event contains `needle`.
    pub fn wait_for_log(&self, id: &str, needle: &str) {
        let mut stream = EventStream::open(&self.url(&format!("/api/runs/{id}/logs/stream")), None);
        while let Some((name, _, data)) = stream.next() {
            if name == "log" && data["text"].as_str().is_some_and(|t| t.contains(needle)) {
                return;
            }
        }
        panic!("the run's log never showed {needle:?}");
    }

    /// Follows the run's event stream to its `end`; returns the events (name, data).
    pub fn follow(&self, id: &str, last_event_id: Option<&str>) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        let mut stream = EventStream::open(
            &self.url(&format!("/api/runs/{id}/logs/stream")),
            last_event_id,
        );
        while let Some((name, _id, data)) = stream.next() {
            let done = name == "end";
            events.push((name, data));
            if done {
                return events;
            }
        }
        panic!("the stream ended without an `end` event: {events:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.terminate() {
            return;
        }
        let pipelines: Vec<String> = std::fs::read_dir(self.pipelines_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "skiff serve at {} ({pipelines:?}) did not stop within 20s of SIGTERM; killed",
            self.base
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(DEADLINE))
        .build()
        .into()
}

/// One HTTP call; the status and the body as JSON (or a JSON string of the text).
pub fn call(method: &str, url: &str, body: Option<&str>, headers: &[(&str, &str)]) -> (u16, Value) {
    let (status, _, text) = raw(method, url, body, headers);
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// One HTTP call; status, headers (lower-case names) and body text.
pub fn raw(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let agent = agent();
    let mut response = match method {
        "HEAD" => {
            let mut r = agent.head(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        "GET" => {
            let mut r = agent.get(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        _ => {
            let mut r = agent.post(url);
            let mut has_type = false;
            for (k, v) in headers {
                has_type |= k.eq_ignore_ascii_case("content-type");
                r = r.header(*k, *v);
            }
            if !has_type && body.is_some() {
                r = r.header("content-type", "application/json");
            }
            r.send(body.unwrap_or("").as_bytes())
        }
    }
    .expect("HTTP call");
    let status = response.status().as_u16();
    let heads = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut text = String::new();
    let _ = response.body_mut().as_reader().read_to_string(&mut text);
    (status, heads, text)
}

/// A Server-Sent Events reader.
pub struct EventStream {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send>>>,
}

impl EventStream {
    pub fn open(url: &str, last_event_id: Option<&str>) -> EventStream {
        let mut req = agent()
            .get(url)
            .header("authorization", &format!("Bearer {ADMIN_TOKEN}"));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.call().expect("open the event stream");
        assert_eq!(response.status().as_u16(), 200, "event stream status");
        let reader: Box<dyn Read + Send> = Box::new(response.into_body().into_reader());
        EventStream {
            lines: BufReader::new(reader).lines(),
        }
    }

    /// The next event: (name, id, data as JSON).
    pub fn next(&mut self) -> Option<(String, Option<String>, Value)> {
        let (mut name, mut id, mut data) = (String::new(), None, String::new());
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if line.is_empty() {
                if !data.is_empty() {
                    return Some((name, id, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("event: ") {
                name = v.to_string();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        None
    }
}

/// Writes a pipeline file into a running server's folder.
pub fn write_pipeline(dir: &Path, name: &str, yaml: &str) {
    std::fs::write(dir.join(format!("{name}.yml")), yaml).expect("write pipeline");
}

/// Waits (bounded) for `check` to hold, for state with no event to wait on (a file reload).
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + DEADLINE;
    while Instant::now() < until {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not happen in time");
}
