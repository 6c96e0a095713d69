//! `skiff serve` over HTTP: triggers, params, logs (plain and live), cancel, rerun, auth, CSRF,
//! bad input, pipeline reloads, metrics, and `skiff trigger`.

use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, EventStream, Server, call, eventually, raw, write_pipeline};
use crate::harness::{all_gone, pids};

const HELLO: &str = "params:\n  who: { default: world }\n  mode: { options: [fast, slow], default: fast }\n  n: { type: number, default: \"1\" }\nsteps:\n  - id: greet\n    run: |\n      echo \"hello $SKIFF_PARAM_WHO ($SKIFF_PARAM_MODE, $SKIFF_PARAM_N)\"\n      echo \"said=hello $SKIFF_PARAM_WHO\" >> \"$SKIFF_OUTPUT\"\n";

fn run_of(events: &[(String, Value)]) -> (String, String) {
    let end = events.last().expect("events");
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "log")
        .map(|(_, d)| d["text"].as_str().unwrap_or("").to_string())
        .collect();
    (end.1["status"].as_str().unwrap_or("").to_string(), text)
}

#[test]
fn trigger_with_params_runs_and_records_everything() {
    let s = Server::start(&[("hello", HELLO)]);
    let (status, body) = s.api(
        "POST",
        "/api/pipelines/hello/runs",
        Some(r#"{"params": {"who": "api", "mode": "slow", "n": 3}}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["number"], 1);
    assert_eq!(
        body["trigger"],
        json!({ "kind": "api", "actor": "admin-token" })
    );
    let id = body["id"].as_str().expect("id");
    let (end, text) = run_of(&s.follow(id, None));
    assert_eq!(end, "succeeded");
    assert!(text.contains("hello api (slow, 3)"), "{text}");
    let (status, run) = s.api("GET", &format!("/api/runs/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        run["params"],
        json!({ "who": "api", "mode": "slow", "n": "3" })
    );
    assert_eq!(run["steps"][0]["outputs"]["said"], "hello api");
    assert_eq!(run["steps"][0]["status"], "succeeded");
    let (status, logs) = s.api("GET", &format!("/api/runs/{id}/logs?offset=0"), None);
    assert_eq!(status, 200);
    assert_eq!(logs["complete"], true);
    assert!(
        logs["chunks"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("hello api")),
        "{logs}"
    );
    let (_, list) = s.api(
        "GET",
        "/api/runs?pipeline=hello&status=succeeded&limit=10",
        None,
    );
    assert_eq!(list["runs"][0]["id"], id);
    let (_, pipeline) = s.api("GET", "/api/pipelines/hello", None);
    assert_eq!(pipeline["valid"], true);
    assert_eq!(pipeline["params"][1]["options"], json!(["fast", "slow"]));
}

#[test]
fn bad_input_gets_the_right_4xx_and_a_json_error() {
    let s = Server::start(&[("hello", HELLO), ("broken", "name: broken\nstpes: []\n")]);
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            "/api/pipelines/hello/runs".into(),
            Some(r#"{"params": {"mode": "turbo", "n": "many", "nope": 1}}"#.into()),
            422,
            "invalid_params",
        ),
        (
            "POST",
            "/api/pipelines/hello/runs".into(),
            Some(r#"{"params": {"who": {"a": 1}}}"#.into()),
            422,
            "invalid_params",
        ),
        (
            "POST",
            "/api/pipelines/hello/runs".into(),
            Some(r#"{"params": "#.into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/api/pipelines/hello/runs".into(),
            Some(r#"{"parms": {}}"#.into()),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/api/pipelines/hello/runs".into(),
            Some(format!(
                r#"{{"params": {{"who": "{}"}}}}"#,
                "x".repeat(400_000)
            )),
            413,
            "too_large",
        ),
        (
            "POST",
            "/api/pipelines/nope/runs".into(),
            Some("{}".into()),
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/pipelines/broken/runs".into(),
            Some("{}".into()),
            409,
            "invalid_pipeline",
        ),
        ("GET", "/api/runs/not-a-uuid".into(), None, 404, "not_found"),
        (
            "GET",
            "/api/runs/01a2130a-017a-779c-ae1c-5a4e843dfa26".into(),
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/api/runs?status=sideways".into(),
            None,
            400,
            "bad_request",
        ),
        ("GET", "/api/runs?limit=0".into(), None, 400, "bad_request"),
        (
            "GET",
            "/api/runs?limit=lots".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/api/runs?cursor=zzz".into(),
            None,
            400,
            "bad_request",
        ),
        ("GET", "/api/nothing-here".into(), None, 404, "not_found"),
    ];
    for (method, path, body, want, code) in cases {
        let (status, value) = s.api(method, &path, body.as_deref());
        assert_eq!(status, want, "{method} {path}: {value}");
        assert_eq!(value["error"]["code"], code, "{method} {path}: {value}");
    }
    let (status, value) = s.api(
        "POST",
        "/api/pipelines/hello/runs",
        Some(r#"{"params": {"mode": "turbo", "n": "many", "nope": 1}}"#),
    );
    assert_eq!(status, 422);
    let fields: Vec<&str> = value["error"]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|f| f["param"].as_str())
        .collect();
    assert_eq!(
        fields,
        vec!["mode", "n", "nope"],
        "every bad param is reported: {value}"
    );
    let (status, value) = call(
        "POST",
        &s.url("/api/pipelines/hello/runs"),
        Some("{}"),
        &[
            ("authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("content-type", "text/plain"),
        ],
    );
    assert_eq!(
        (status, value["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    // Offsets.
    let id = s.trigger("hello", json!({}));
    s.follow(&id, None);
    let (status, value) = s.api("GET", &format!("/api/runs/{id}/logs?offset=99999"), None);
    assert_eq!(
        (status, value["error"]["code"].as_str()),
        (416, Some("bad_offset"))
    );
    let (status, _) = s.api("GET", &format!("/api/runs/{id}/logs?offset=-1"), None);
    assert_eq!(status, 400);
    let (status, _) = s.api(
        "GET",
        &format!("/api/runs/{id}/logs/stream?offset=99999"),
        None,
    );
    assert_eq!(status, 416);
    let (status, value) = s.api("GET", "/api/pipelines/broken", None);
    assert_eq!(status, 200);
    assert_eq!(value["valid"], false);
    assert!(
        value["diagnostics"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stpes")),
        "{value}"
    );
}

#[test]
fn live_logs_follow_to_the_end_and_resume_in_the_middle() {
    let s = Server::start(&[(
        "count",
        "steps:\n  - run: |\n      for i in $(seq 1 40); do echo \"line $i\"; sleep 0.02; done\n  - run: echo done\n",
    )]);
    let id = s.trigger("count", json!({}));
    let url = s.url(&format!("/api/runs/{id}/logs/stream"));
    // Read a few log events, then drop the connection.
    let mut first = EventStream::open(&url, None);
    let mut text = String::new();
    let mut last_id = None;
    let mut logs = 0;
    while logs < 3 {
        let (name, eid, data) = first.next().expect("an event");
        if name == "log" {
            logs += 1;
            text.push_str(data["text"].as_str().unwrap_or(""));
            last_id = eid;
        }
    }
    drop(first);
    let last_id = last_id.expect("log events carry ids");
    // Resume from the last id: no gap, no repeat.
    let events = s.follow(&id, Some(&last_id));
    let (end, rest) = run_of(&events);
    text.push_str(&rest);
    assert_eq!(end, "succeeded");
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect::<String>() + "done\n";
    assert_eq!(
        text, expected,
        "the resumed stream continues exactly where it stopped"
    );
    assert!(
        events
            .iter()
            .any(|(n, d)| n == "step" && d["status"] == "succeeded"),
        "step events come too"
    );
    // A follower that connects after the end gets everything and the end.
    let (end, all) = run_of(&s.follow(&id, None));
    assert_eq!((end.as_str(), all), ("succeeded", expected));
}

#[test]
fn cancel_stops_a_long_run_and_its_finally_runs() {
    let scratch = crate::harness::scratch();
    let pidfile = scratch.path().join("pids");
    let yaml = format!(
        "steps:\n  - id: long\n    run: |\n      sleep 1000 &\n      echo $! >> {p}\n      echo $$ >> {p}\n      echo started\n      sleep 1000\nfinally:\n  - run: echo \"finally after $SKIFF_RUN_STATUS\"\n",
        p = pidfile.display()
    );
    let s = Server::start(&[("long", &yaml)]);
    let id = s.trigger("long", json!({}));
    s.wait_for_log(&id, "started");
    let (status, body) = s.api("POST", &format!("/api/runs/{id}/cancel"), None);
    assert_eq!(status, 202, "{body}");
    let events = s.follow(&id, None);
    let (end, text) = run_of(&events);
    assert_eq!(end, "cancelled");
    assert!(text.contains("finally after cancelled"), "{text}");
    let (_, run) = s.api("GET", &format!("/api/runs/{id}"), None);
    assert_eq!(run["steps"][0]["status"], "cancelled");
    assert_eq!(run["steps"][1]["status"], "succeeded");
    assert_eq!(run["reason"], "cancelled by admin-token");
    assert!(all_gone(&pids(&pidfile)), "the step's process tree is gone");
    let (status, body) = s.api("POST", &format!("/api/runs/{id}/cancel"), None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("already_ended"))
    );
}

#[test]
fn rerun_uses_the_same_snapshot_and_params() {
    let s = Server::start(&[("hello", HELLO)]);
    let id = s.trigger("hello", json!({ "who": "first" }));
    s.follow(&id, None);
    // Change the file: a rerun still runs the snapshot.
    write_pipeline(
        &s.pipelines_dir(),
        "hello",
        "params:\n  who: { default: x }\nsteps:\n  - run: echo changed\n",
    );
    eventually("the pipeline reloads", || {
        s.api("GET", "/api/pipelines/hello", None).1["params"]
            .as_array()
            .is_some_and(|p| p.len() == 1)
    });
    let (status, rerun) = s.api("POST", &format!("/api/runs/{id}/rerun"), None);
    assert_eq!(status, 201, "{rerun}");
    assert_eq!(rerun["rerun_of"], id);
    assert_eq!(rerun["number"], 2);
    assert_eq!(rerun["params"]["who"], "first");
    assert_eq!(rerun["trigger"]["kind"], "rerun");
    let (end, text) = run_of(&s.follow(rerun["id"].as_str().expect("id"), None));
    assert_eq!(end, "succeeded");
    assert!(
        text.contains("hello first") && !text.contains("changed"),
        "{text}"
    );
}

#[test]
fn authentication_is_required_and_tokens_can_be_revoked() {
    let s = Server::start(&[("hello", HELLO)]);
    let (status, _, body) = raw("GET", &s.url("/healthz"), None, &[]);
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "the health check is open"
    );
    for (method, path) in [
        ("GET", "/api/pipelines"),
        ("GET", "/api/pipelines/hello"),
        ("POST", "/api/pipelines/hello/runs"),
        ("GET", "/api/runs"),
        ("GET", "/api/runs/01a2130a-017a-779c-ae1c-5a4e843dfa26/logs"),
        (
            "GET",
            "/api/runs/01a2130a-017a-779c-ae1c-5a4e843dfa26/logs/stream",
        ),
        (
            "POST",
            "/api/runs/01a2130a-017a-779c-ae1c-5a4e843dfa26/cancel",
        ),
        (
            "POST",
            "/api/runs/01a2130a-017a-779c-ae1c-5a4e843dfa26/rerun",
        ),
        ("GET", "/api/tokens"),
        ("GET", "/api/openapi.json"),
        ("GET", "/metrics"),
    ] {
        let (status, body) = call(method, &s.url(path), Some("{}"), &[]);
        assert_eq!(status, 401, "{method} {path} without credentials: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = call(
            method,
            &s.url(path),
            Some("{}"),
            &[("authorization", "Bearer wrong-token")],
        );
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    let (status, _, page) = raw("GET", &s.url("/"), None, &[]);
    assert!(
        status == 303 && !page.contains("hello"),
        "the UI sends strangers to the login page"
    );

    let (status, created) = s.api("POST", "/api/tokens", Some(r#"{"name": "ci"}"#));
    assert_eq!(status, 201, "{created}");
    let token = created["token"]
        .as_str()
        .expect("the secret is shown once")
        .to_string();
    let auth = format!("Bearer {token}");
    let (status, run) = call(
        "POST",
        &s.url("/api/pipelines/hello/runs"),
        Some("{}"),
        &[("authorization", &auth)],
    );
    assert_eq!(status, 201);
    assert_eq!(
        run["trigger"]["actor"], "token:ci",
        "the run records who triggered it"
    );
    let (_, tokens) = s.api("GET", "/api/tokens", None);
    assert!(
        !tokens.to_string().contains(&token),
        "listing never shows secrets"
    );
    let (status, _) = s.api(
        "POST",
        &format!("/api/tokens/{}/revoke", created["id"].as_str().expect("id")),
        None,
    );
    assert_eq!(status, 204);
    let (status, _) = call(
        "GET",
        &s.url("/api/runs"),
        None,
        &[("authorization", &auth)],
    );
    assert_eq!(status, 401, "a revoked token is refused");
}

/// Signs in with the one-time login link; returns the session cookie.
pub fn sign_in(s: &Server) -> String {
    let (status, headers, _) = raw("GET", &s.login_link, None, &[]);
    assert_eq!(status, 303);
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.clone())
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie.split(';').next().expect("cookie").to_string()
}

pub fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..].split('"').next().expect("value").to_string()
}

#[test]
fn sessions_need_csrf_for_changes_and_links_work_once() {
    let s = Server::start(&[("hello", HELLO)]);
    let cookie = sign_in(&s);
    let (status, _, _) = raw("GET", &s.login_link, None, &[]);
    assert_eq!(status, 401, "a login link works once");
    let (status, _, page) = raw("GET", &s.url("/"), None, &[("cookie", &cookie)]);
    assert_eq!(status, 200);
    assert!(page.contains("hello"), "the dashboard lists the pipeline");
    let csrf = csrf_of(&page);
    // API with the session but without the CSRF header: refused.
    let (status, body) = call(
        "POST",
        &s.url("/api/pipelines/hello/runs"),
        Some("{}"),
        &[("cookie", &cookie)],
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("csrf"))
    );
    let (status, _) = call(
        "POST",
        &s.url("/api/pipelines/hello/runs"),
        Some("{}"),
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    );
    assert_eq!(status, 201, "with the header it works");
    let (status, _) = call("GET", &s.url("/api/runs"), None, &[("cookie", &cookie)]);
    assert_eq!(status, 200, "reads need no CSRF token");
    // The UI's forms.
    let form = [
        ("cookie", cookie.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let (status, _, _) = raw(
        "POST",
        &s.url("/pipelines/hello/run"),
        Some("param.who=form"),
        &form,
    );
    assert_eq!(status, 403, "a form without its CSRF token is refused");
    let (status, _, _) = raw(
        "POST",
        &s.url("/pipelines/hello/run"),
        Some("csrf=wrong&param.who=form"),
        &form,
    );
    assert_eq!(status, 403, "a wrong CSRF token is refused");
    let (status, headers, _) = raw(
        "POST",
        &s.url("/pipelines/hello/run"),
        Some(&format!("csrf={csrf}&param.who=form")),
        &form,
    );
    assert_eq!(status, 303);
    let location = headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .expect("redirect to the run");
    assert!(location.starts_with("/runs/"), "{location}");
    let (status, _, page) = raw(
        "POST",
        &s.url("/pipelines/hello/run"),
        Some(&format!("csrf={csrf}&param.mode=turbo")),
        &form,
    );
    assert_eq!(status, 422, "bad params come back to the form");
    assert!(page.contains("`turbo` is not one of"), "with the reason");
    // Password: set it, then sign in with it.
    let (status, _, page) = raw(
        "POST",
        &s.url("/settings/password"),
        Some(&format!(
            "csrf={csrf}&password=correct-horse-1&confirm=correct-horse-1"
        )),
        &form,
    );
    assert_eq!(status, 200, "{page}");
    let (status, _, _) = raw(
        "POST",
        &s.url("/login"),
        Some("password=wrong-password"),
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(status, 401);
    let (status, headers, _) = raw(
        "POST",
        &s.url("/login"),
        Some("password=correct-horse-1"),
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(status, 303);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "set-cookie" && v.starts_with("skiff_session="))
    );
    // Guessing is slowed: five wrong passwords a minute, then even the right one waits.
    let login = |password: &str| {
        raw(
            "POST",
            &s.url("/login"),
            Some(&format!("password={password}")),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
    };
    for guess in 2..=5 {
        let (status, _, _) = login(&format!("guess-{guess}"));
        assert_eq!(status, 401, "guess {guess}");
    }
    let (status, headers, page) = login("correct-horse-1");
    assert_eq!(status, 429, "{page}");
    assert!(page.contains("too many password attempts"), "{page}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "retry-after"
                && v.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s))),
        "{headers:?}"
    );
}

#[test]
fn pipelines_reload_and_a_bad_file_never_stops_the_server() {
    let s = Server::start(&[("hello", HELLO)]);
    write_pipeline(&s.pipelines_dir(), "added", "steps:\n  - run: echo added\n");
    write_pipeline(
        &s.pipelines_dir(),
        "bad",
        "steps:\n  - run: echo\n    timeout: soon\n",
    );
    eventually("new files appear", || {
        let (_, list) = s.api("GET", "/api/pipelines", None);
        list["pipelines"].as_array().is_some_and(|p| p.len() == 3)
    });
    let (_, bad) = s.api("GET", "/api/pipelines/bad", None);
    assert_eq!(bad["valid"], false);
    assert_eq!(bad["diagnostics"][0]["line"], 3);
    let id = s.trigger("added", json!({}));
    assert_eq!(run_of(&s.follow(&id, None)).0, "succeeded");
    std::fs::remove_file(s.pipelines_dir().join("added.yml")).expect("remove");
    eventually("a removed file disappears", || {
        s.api("GET", "/api/pipelines/added", None).0 == 404
    });
}

#[test]
fn metrics_and_openapi_are_served() {
    let s = Server::start(&[("hello", HELLO)]);
    let id = s.trigger("hello", json!({}));
    s.follow(&id, None);
    let (status, _, text) = raw(
        "GET",
        &s.url("/metrics"),
        None,
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
    );
    assert_eq!(status, 200);
    for needle in [
        "skiff_runs{status=\"succeeded\"} 1",
        "skiff_queue_depth 0",
        "skiff_step_duration_seconds",
        "skiff_queue_wait_seconds",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    let (status, doc) = s.api("GET", "/api/openapi.json", None);
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/api/pipelines",
        "/api/pipelines/{name}/runs",
        "/api/runs/{id}/logs/stream",
        "/api/runs/{id}/rerun",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
}

#[test]
fn skiff_trigger_follows_a_run_to_its_end() {
    let s = Server::start(&[
        ("hello", HELLO),
        ("fails", "steps:\n  - run: echo failing; exit 3\n"),
    ]);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.args([
        "trigger", "hello", "--param", "who=cli", "--follow", "--server", &s.base,
    ])
    .env("SKIFF_TOKEN", ADMIN_TOKEN);
    let out = crate::harness::run_to_end(cmd);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("hello cli (fast, 1)"), "{}", out.all());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.args(["trigger", "fails", "--follow", "--server", &s.base])
        .env("SKIFF_TOKEN", ADMIN_TOKEN);
    let out = crate::harness::run_to_end(cmd);
    assert_eq!(
        out.code,
        Some(1),
        "a failed run fails the command: {}",
        out.all()
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.args([
        "trigger",
        "hello",
        "--param",
        "mode=turbo",
        "--server",
        &s.base,
    ])
    .env("SKIFF_TOKEN", ADMIN_TOKEN);
    let out = crate::harness::run_to_end(cmd);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("param `mode`: `turbo` is not one of"),
        "{}",
        out.stderr
    );
}

#[test]
fn behind_https_the_session_cookie_is_secure() {
    // The scheme in any case; a preview's HEAD does not use the link up.
    let s = Server::start_with(
        &[("hello", HELLO)],
        &[("SKIFF_PUBLIC_URL", "HTTPS://skiff.example.org")],
    );
    assert!(
        s.login_link
            .starts_with("HTTPS://skiff.example.org/login/link/"),
        "{}",
        s.login_link
    );
    let token = s.login_link.rsplit('/').next().expect("token");
    let (status, _, _) = raw("HEAD", &s.url(&format!("/login/link/{token}")), None, &[]);
    assert_eq!(status, 200);
    let (status, headers, _) = raw("GET", &s.url(&format!("/login/link/{token}")), None, &[]);
    assert_eq!(status, 303);
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.clone())
        .expect("cookie");
    assert!(cookie.contains("; Secure"), "{cookie}");
}

/// A connection to the server from a given loopback address (the server listens on
/// 127.0.0.1; all of 127.0.0.0/8 reaches it).
fn connect_from(s: &Server, from: [u8; 4]) -> std::net::TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let port: u16 = s
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    bind(raw, &SockaddrIn::new(from[0], from[1], from[2], from[3], 0)).expect("bind");
    connect(raw, &SockaddrIn::new(127, 0, 0, 1, port)).expect("connect");
    std::net::TcpStream::from(fd)
}

/// A login POST from a given loopback address; the status.
fn login_from(s: &Server, from: [u8; 4], password: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = connect_from(s, from);
    let body = format!("password={password}");
    // A connection the server closed at once (past the per-address share) may refuse the
    // write: that is an answer too (0, below).
    let _ = write!(
        stream,
        "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    // 0: the server closed the connection unanswered (past the connections one address may hold).
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn parallel_password_guesses_are_counted_and_the_owner_elsewhere_still_gets_in() {
    let s = Server::start(&[("hello", HELLO)]);
    let cookie = sign_in(&s);
    let (_, _, page) = raw("GET", &s.url("/settings"), None, &[("cookie", &cookie)]);
    let csrf = csrf_of(&page);
    let (status, _, page) = raw(
        "POST",
        &s.url("/settings/password"),
        Some(&format!(
            "csrf={csrf}&password=owner-pass-123&confirm=owner-pass-123"
        )),
        &[
            ("cookie", cookie.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    // 100 wrong guesses at once from one address: five are checked, the rest refused unchecked.
    let s = std::sync::Arc::new(s);
    let statuses: Vec<u16> = (0..100)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || login_from(&s, [127, 0, 0, 9], &format!("guess-{i}")))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("guess"))
        .collect();
    // (Connections past the 64 one address may hold are closed unanswered: 0.)
    let checked = statuses.iter().filter(|c| **c == 401).count();
    let refused = statuses.iter().filter(|c| matches!(**c, 429 | 0)).count();
    assert_eq!((checked, refused), (5, 95), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // That address is refused even the right password; the owner, elsewhere, gets in.
    assert_eq!(login_from(&s, [127, 0, 0, 9], "owner-pass-123"), 429);
    assert_eq!(login_from(&s, [127, 0, 0, 10], "owner-pass-123"), 303);
}

/// Connected from `from`, a request's head sent half; the open socket.
fn half_open(s: &Server, from: [u8; 4]) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = connect_from(s, from);
    let _ = stream.write_all(b"POST /api/pipelines/hello/runs HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    stream
}

#[test]
fn half_open_connections_do_not_starve_the_server() {
    use std::io::Read;
    let s = Server::start(&[("hello", HELLO)]);
    // 300 connections from one address, each with half a request head, held open.
    let held: Vec<std::net::TcpStream> = (0..300).map(|_| half_open(&s, [127, 0, 0, 9])).collect();
    // Past its share, that address's connections are closed at once (read: end of stream).
    let is_closed = |mut c: &std::net::TcpStream| {
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    };
    for c in &held {
        c.set_nonblocking(true).expect("nonblocking");
    }
    let mut closed = 0;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        closed = held.iter().skip(100).filter(|c| is_closed(c)).count();
        if closed == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        closed, 200,
        "connections past the per-address share are closed"
    );
    // Everyone else is served as usual.
    let (status, _) = crate::harness::call("GET", &s.url("/healthz"), None, &[]);
    assert_eq!(status, 200);
    let id = s.trigger("hello", json!({}));
    assert_eq!(s.wait_for_end(&id)["status"], "succeeded");
    drop(held);
}

/// The admin token comes from the environment or a private file, never a flag, and one that
/// could never match an `Authorization` header is a start error.
#[test]
fn the_admin_token_is_checked_at_start_and_never_a_flag() {
    let sb = crate::harness::Sandbox::new();
    let start = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = sb.skiff(&[&["serve", "--listen", "127.0.0.1:0"], args].concat());
        cmd.env_remove("SKIFF_ADMIN_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        crate::harness::run_to_end(cmd)
    };
    for (token, needle) in [
        ("short-token", "at least 16 characters"),
        ("ééééééééééééééééé", "printable ASCII"),
        ("a token with spaces in it", "printable ASCII"),
    ] {
        let out = start(&[("SKIFF_ADMIN_TOKEN", token)], &[]);
        assert_ne!(out.code, Some(0), "{token:?}");
        assert!(out.stderr.contains(needle), "{token:?}: {}", out.stderr);
    }
    let out = start(&[], &["--admin-token", "long-enough-admin-token-123"]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("/proc/PID/cmdline"), "{}", out.stderr);
    let file = sb.path().join("admin-token");
    std::fs::write(&file, "file-admin-token-0123456789\n").expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let out = start(&[], &["--admin-token-file", file.to_str().expect("path")]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    // A private file works.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let s = Server::start_with(
        &[("hello", HELLO)],
        &[
            ("SKIFF_ADMIN_TOKEN", ""),
            ("SKIFF_ADMIN_TOKEN_FILE", file.to_str().expect("path")),
        ],
    );
    let (status, _) = call(
        "GET",
        &s.url("/api/runs"),
        None,
        &[("authorization", "Bearer file-admin-token-0123456789")],
    );
    assert_eq!(status, 200);
}

/// A request whose body never comes is answered 408 once the body deadline (30 s) has passed,
/// and the connection is let go: an API call, and a webhook delivery (whose body its handler
/// reads as it comes, under the same deadline).
#[test]
fn a_body_that_never_comes_is_answered_408() {
    use std::io::{Read, Write};
    let s = Server::start(&[("hello", HELLO)]);
    let mut api = connect_from(&s, [127, 0, 0, 11]);
    write!(
        api,
        "POST /api/pipelines/hello/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .expect("send");
    let mut hook = connect_from(&s, [127, 0, 0, 12]);
    write!(
        hook,
        "POST /hooks/repo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nContent-Length: 100\r\n\r\n{{"
    )
    .expect("send");
    for mut c in [api, hook] {
        c.set_read_timeout(Some(std::time::Duration::from_secs(45)))
            .expect("timeout");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("body_timeout"), "{text}");
    }
    let (_, runs) = s.api("GET", "/api/runs", None);
    assert_eq!(runs["runs"], json!([]), "no run was started");
}
