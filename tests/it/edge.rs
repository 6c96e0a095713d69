//! The API's edge: params kept as sent and bounded, bodies that must be objects, every error a
//! JSON body, one rule for `limit`, metrics that `promtool` accepts, and an OpenAPI document
//! that a validator accepts and that lists every route with every status it can answer.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Server, call, raw};
use crate::ui::assert_html_error;

const HELLO: &str = "params:\n  who: { default: world }\n  n: { type: number, default: \"1\" }\nsteps:\n  - id: greet\n    run: echo \"hello $SKIFF_PARAM_WHO $SKIFF_PARAM_N\"\n";

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Asserts that a response is the JSON error body with `status` and `code`.
fn assert_json_error(
    what: &str,
    (status, headers, body): &(u16, Vec<(String, String)>, String),
    want: u16,
    code: &str,
) {
    assert_eq!(*status, want, "{what}: {body}");
    assert!(
        header(headers, "content-type").is_some_and(|t| t.starts_with("application/json")),
        "{what}: content-type {:?}, body {body:?}",
        header(headers, "content-type")
    );
    let value: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {body:?}"));
    assert_eq!(value["error"]["code"], code, "{what}: {value}");
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {value}"
    );
}

/// Runs a program that a test needs; a missing one fails the test with the package to install.
pub fn tool(program: &str, args: &[&str], stdin: Option<&str>, package: &str) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is not installed: this test needs it; install {package} (.ci/run does)"
        ),
        Err(e) => panic!("starting `{program}`: {e}"),
    };
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("write to the tool");
    }
    let out = crate::harness::wait_with_deadline(child);
    (out.code == Some(0), out.all())
}

#[test]
fn json_numbers_keep_the_text_they_were_sent_as() {
    let s = Server::start(&[("hello", HELLO)]);
    let (status, run) = s.api(
        "POST",
        "/api/pipelines/hello/runs",
        Some(r#"{"params": {"n": 12345678901234567890123, "who": 1.50}}"#),
    );
    assert_eq!(status, 201, "{run}");
    assert_eq!(
        run["params"],
        json!({ "n": "12345678901234567890123", "who": "1.50" })
    );
    let id = run["id"].as_str().expect("id");
    let events = s.follow(id, None);
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "log")
        .map(|(_, d)| d["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, "hello 1.50 12345678901234567890123\n");
    // Strings are decoded, booleans are their text; escapes inside strings still work.
    let (status, run) = s.api(
        "POST",
        "/api/pipelines/hello/runs",
        Some(r#"{"params": {"n": -0.5e-3, "who": "a\"b\u00e9"}}"#),
    );
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["params"], json!({ "n": "-0.5e-3", "who": "a\"bé" }));
}

#[test]
fn params_with_a_nul_or_past_the_size_limits_are_refused_at_trigger_time() {
    let s = Server::start(&[("hello", HELLO)]);
    let cases = [
        (json!({ "who": "a\u{0}b" }), "NUL"),
        (json!({ "who": "x".repeat(250_000) }), "32 KiB"),
        (json!({ "who": "x".repeat(32 * 1024 + 1) }), "32 KiB"),
    ];
    for (params, needle) in cases {
        let body = json!({ "params": params }).to_string();
        let (status, value) = s.api("POST", "/api/pipelines/hello/runs", Some(&body));
        assert_eq!(status, 422, "{needle}: {value:.300}");
        assert_eq!(value["error"]["code"], "invalid_params");
        let fields = value["error"]["fields"].as_array().expect("fields");
        assert_eq!(fields.len(), 1, "{value:.300}");
        assert_eq!(fields[0]["param"], "who");
        let message = fields[0]["message"].as_str().expect("message");
        assert!(message.contains(needle), "{message}");
        assert!(message.len() < 300, "the message does not echo the value");
    }
    let (status, runs) = s.api("GET", "/api/runs", None);
    assert_eq!(status, 200);
    assert_eq!(runs["runs"], json!([]), "no run was created");
    // A value of exactly 32 KiB is fine, and reaches the step.
    let id = s.trigger("hello", json!({ "who": "y".repeat(32 * 1024) }));
    let events = s.follow(&id, None);
    assert_eq!(events.last().expect("end").1["status"], "succeeded");

    // The same rules hold for the UI's form.
    let cookie = crate::api::sign_in(&s);
    let (_, _, page) = raw("GET", &s.url("/"), None, &[("cookie", &cookie)]);
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    let csrf = page[at..].split('"').next().expect("value");
    let (status, _, page) = raw(
        "POST",
        &s.url("/pipelines/hello/run"),
        Some(&format!("csrf={csrf}&param.who=a%00b")),
        &[
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(status, 422, "{page}");
    assert!(page.contains("NUL"), "{page}");
}

#[test]
fn skiff_run_refuses_params_past_the_limits() {
    let sb = crate::harness::Sandbox::new();
    let names: Vec<String> = (0..9).map(|i| format!("p{i}")).collect();
    let yaml = format!(
        "params:\n{}steps:\n  - run: echo ok\n",
        names
            .iter()
            .map(|n| format!("  {n}: {{ default: \"\" }}\n"))
            .collect::<String>()
    );
    let file = sb.pipeline("many", &yaml);
    let file = file.to_str().expect("path");
    // One value over 32 KiB.
    let big = format!("p0={}", "x".repeat(40 * 1024));
    let out = sb.run(&["run", file, "--param", &big]);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.stderr.contains("param `p0`") && out.stderr.contains("32 KiB"),
        "{}",
        out.stderr
    );
    // Nine values of 30 KiB each: every one fits, but not all together.
    let mut args = vec!["run".to_string(), file.to_string()];
    for n in &names {
        args.push("--param".into());
        args.push(format!("{n}={}", "x".repeat(30 * 1024)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sb.run(&args);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("256 KiB"), "{}", out.stderr);
}

#[test]
fn bodies_must_be_json_objects() {
    let s = Server::start(&[("hello", HELLO)]);
    for (path, body) in [
        ("/api/pipelines/hello/runs", r#"[{"who": "x"}]"#),
        ("/api/pipelines/hello/runs", "[]"),
        ("/api/pipelines/hello/runs", "\"params\""),
        ("/api/pipelines/hello/runs", "null"),
        ("/api/tokens", r#"["ci"]"#),
        ("/api/tokens", "42"),
    ] {
        let response = raw(
            "POST",
            &s.url(path),
            Some(body),
            &[("authorization", &bearer())],
        );
        assert_json_error(
            &format!("POST {path} {body}"),
            &response,
            422,
            "invalid_body",
        );
    }
    let (status, runs) = s.api("GET", "/api/runs", None);
    assert_eq!(
        (status, &runs["runs"]),
        (200, &json!([])),
        "no run was created"
    );
    let (_, tokens) = s.api("GET", "/api/tokens", None);
    assert_eq!(tokens["tokens"], json!([]), "no token was created");
    // Objects still work, for both.
    let response = raw(
        "POST",
        &s.url("/api/tokens"),
        Some(r#"{"name": "ci"}"#),
        &[("authorization", &bearer())],
    );
    assert_eq!(response.0, 201, "{}", response.2);
}

#[test]
fn every_error_is_the_json_error_body() {
    let s = Server::start(&[("hello", HELLO)]);
    let auth = bearer();
    let auth = [("authorization", auth.as_str())];
    let id = s.trigger("hello", json!({}));
    s.follow(&id, None);
    let get = |path: &str| raw("GET", &s.url(path), None, &auth);
    let post = |path: &str, body: &str, ty: &str| {
        raw(
            "POST",
            &s.url(path),
            Some(body),
            &[auth[0], ("content-type", ty)],
        )
    };
    // A wrong method: 405 with the Allow header and a JSON body.
    let response = post("/api/runs", "{}", "application/json");
    assert_json_error("POST /api/runs", &response, 405, "method_not_allowed");
    assert_eq!(header(&response.1, "allow"), Some("GET,HEAD"));
    let response = get("/api/pipelines/hello/runs");
    assert_json_error("GET a POST route", &response, 405, "method_not_allowed");
    // Paths that are not UTF-8 once decoded.
    for path in [
        "/api/runs/%FF",
        "/api/pipelines/%FF",
        "/api/runs/%FF/logs",
        "/api/runs/%FF/logs/stream",
    ] {
        assert_json_error(path, &get(path), 400, "bad_request");
    }
    assert_json_error(
        "revoke %FF",
        &post("/api/tokens/%FF/revoke", "", "application/json"),
        400,
        "bad_request",
    );
    // Queries that do not parse.
    for path in [
        "/api/runs?limit=lots",
        "/api/runs?nope=1",
        &format!("/api/runs/{id}/logs?offset=-1"),
        &format!("/api/runs/{id}/logs/stream?offset=x"),
    ] {
        assert_json_error(path, &get(path), 400, "bad_request");
    }
    // Bodies: too large, not JSON, malformed.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(300_000));
    assert_json_error(
        "a huge token body",
        &post("/api/tokens", &huge, "application/json"),
        413,
        "too_large",
    );
    assert_json_error(
        "a token body as text",
        &post("/api/tokens", r#"{"name": "x"}"#, "text/plain"),
        415,
        "unsupported_media_type",
    );
    assert_json_error(
        "a malformed token body",
        &post("/api/tokens", r#"{"name": "#, "application/json"),
        400,
        "malformed_json",
    );
    // Unknown routes, API or not.
    assert_json_error("unknown API route", &get("/api/nothing"), 404, "not_found");
    // Pages answer their errors as HTML pages with a way back (`ui::assert_html_error`).
    let cookie = crate::api::sign_in(&s);
    let page = |method: &str, path: &str, body: Option<&str>| {
        raw(
            method,
            &s.url(path),
            body,
            &[
                ("cookie", &cookie),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
    };
    assert_html_error(
        "unknown page",
        &page("GET", "/nothing", None),
        404,
        "not_found",
    );
    assert_html_error(
        "UI 405",
        &page("POST", "/settings", Some("")),
        405,
        "method_not_allowed",
    );
    assert_html_error(
        "UI bad path",
        &page("GET", "/runs/%FF", None),
        400,
        "bad_request",
    );
    let big_form = format!("csrf=x&param.who={}", "x".repeat(300_000));
    assert_html_error(
        "UI huge form",
        &page("POST", "/pipelines/hello/run", Some(&big_form)),
        413,
        "too_large",
    );
}

#[test]
fn every_limit_follows_one_rule() {
    let s = Server::start(&[("hello", HELLO)]);
    let id = s.trigger("hello", json!({}));
    s.follow(&id, None);
    for (path, range) in [
        (format!("/api/runs/{id}/logs?limit=0"), "1 and 1048576"),
        (
            format!("/api/runs/{id}/logs?limit=1048577"),
            "1 and 1048576",
        ),
        ("/api/runs?limit=0".to_string(), "1 and 500"),
        ("/api/runs?limit=501".to_string(), "1 and 500"),
    ] {
        let (status, value) = s.api("GET", &path, None);
        assert_eq!(status, 400, "{path}: {value}");
        assert_eq!(value["error"]["code"], "bad_request", "{path}: {value}");
        let message = value["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(range), "{path}: {message}");
    }
    let (status, logs) = s.api("GET", &format!("/api/runs/{id}/logs?limit=5"), None);
    assert_eq!(status, 200, "{logs}");
    assert_eq!(logs["next_offset"], 5, "{logs}");
    let (status, logs) = s.api("GET", &format!("/api/runs/{id}/logs?limit=1048576"), None);
    assert_eq!(
        (status, logs["complete"].as_bool()),
        (200, Some(true)),
        "{logs}"
    );
    let (status, _) = s.api("GET", "/api/runs?limit=500", None);
    assert_eq!(status, 200);
}

#[test]
fn metrics_pass_promtool_and_histograms_have_buckets() {
    let s = Server::start(&[("hello", HELLO), ("fails", "steps:\n  - run: exit 3\n")]);
    for pipeline in ["hello", "fails", "hello"] {
        let id = s.trigger(pipeline, json!({}));
        s.follow(&id, None);
    }
    let (status, headers, text) = raw(
        "GET",
        &s.url("/metrics"),
        None,
        &[("authorization", &bearer())],
    );
    assert_eq!(status, 200);
    assert!(
        header(&headers, "content-type").is_some_and(|t| t.starts_with("text/plain")),
        "{headers:?}"
    );
    let (ok, out) = tool(
        "promtool",
        &["check", "metrics"],
        Some(&text),
        "Debian's `prometheus` package (apt-get install prometheus)",
    );
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}\non:\n{text}"
    );
    for name in [
        "skiff_runs",
        "skiff_queue_depth",
        "skiff_step_duration_seconds",
        "skiff_queue_wait_seconds",
        "skiff_runs_finished_total",
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{text}"
        );
    }
    assert!(
        text.contains("# TYPE skiff_step_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE skiff_queue_wait_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("skiff_queue_wait_seconds_bucket{le=\"0.0005\"}"),
        "queue waits are counted from half a millisecond:\n{text}"
    );
    assert!(
        text.contains("skiff_step_duration_seconds_count{status=\"failed\"} 1"),
        "{text}"
    );
    assert!(!text.contains("quantile="), "no summaries:\n{text}");
}

/// The statuses an operation documents.
fn statuses(op: &Value) -> Vec<String> {
    op["responses"]
        .as_object()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn the_openapi_document_is_valid_and_matches_the_server() {
    let s = Server::start(&[("hello", HELLO)]);
    let (status, doc) = s.api("GET", "/api/openapi.json", None);
    assert_eq!(status, 200, "{doc}");
    // The validator, on the document as served.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).expect("write");
    let (ok, out) = tool(
        "openapi-spec-validator",
        &[file.to_str().expect("path")],
        None,
        "PyPI's `openapi-spec-validator` (pip install openapi-spec-validator)",
    );
    assert!(ok, "openapi-spec-validator:\n{out}");

    let paths = doc["paths"].as_object().expect("paths");
    for path in [
        "/healthz",
        "/metrics",
        "/api/openapi.json",
        "/api/pipelines",
        "/api/pipelines/{name}",
        "/api/pipelines/{name}/runs",
        "/api/runs",
        "/api/runs/{id}",
        "/api/runs/{id}/logs",
        "/api/runs/{id}/logs/stream",
        "/api/runs/{id}/cancel",
        "/api/runs/{id}/rerun",
        "/api/tokens",
        "/api/tokens/{id}/revoke",
        "/api/deliveries",
        "/api/deliveries/{key}",
        "/api/deliveries/{key}/redeliver",
        "/hooks/{id}",
    ] {
        assert!(paths.contains_key(path), "{path} is documented");
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");
    assert_eq!(schemes["session"]["in"], "cookie", "{schemes}");
    assert_eq!(schemes["session"]["name"], "skiff_session", "{schemes}");
    assert_eq!(schemes["csrf"]["in"], "header", "{schemes}");
    assert_eq!(schemes["csrf"]["name"], "X-CSRF-Token", "{schemes}");
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let what = format!("{method} {path}");
            let codes = statuses(op);
            if path == "/healthz" {
                assert_eq!(op["security"], json!([]), "{what} is open");
                continue;
            }
            if path == "/hooks/{id}" {
                // Signed, not signed in: an unknown hook answers 401 like a bad signature (no
                // 404, so the URL cannot probe pipeline names).
                assert_eq!(
                    op["security"],
                    json!([]),
                    "{what} takes no session or token"
                );
                assert!(
                    codes.contains(&"401".into()) && codes.contains(&"413".into()),
                    "{what}: {codes:?}"
                );
                assert!(!codes.contains(&"404".into()), "{what}: {codes:?}");
                continue;
            }
            assert!(codes.contains(&"401".into()), "{what}: {codes:?}");
            // 403: a token whose scope does not allow it (and, for a POST, a missing CSRF token).
            assert!(codes.contains(&"403".into()), "{what}: {codes:?}");
            let scope = op["security"][0]["bearer"][0].as_str().unwrap_or("");
            assert!(
                matches!(scope, "read" | "run" | "admin"),
                "{what} names its scope"
            );
            if path.contains('{') {
                for code in ["400", "404"] {
                    assert!(codes.contains(&code.into()), "{what}: {codes:?}");
                }
            }
            // Every error status is described by the one error body.
            for code in codes
                .iter()
                .filter(|c| c.starts_with('4') || c.starts_with('5'))
            {
                assert_eq!(
                    op["responses"][code]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{what} {code}"
                );
            }
        }
    }
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    assert!(statuses(&op("/api/runs/{id}/logs", "get")).contains(&"400".into()));
    assert!(statuses(&op("/api/runs/{id}/rerun", "post")).contains(&"409".into()));
    let stream = op("/api/runs/{id}/logs/stream", "get");
    let params: Vec<(String, String)> = stream["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_string(),
                p["in"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [
        ("format", "query"),
        ("offset", "query"),
        ("Last-Event-ID", "header"),
    ] {
        assert!(
            params.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {params:?}"
        );
    }
    assert!(
        stream["responses"]["200"]["content"]["text/event-stream"].is_object(),
        "{stream}"
    );
    let limit = op("/api/runs", "get")["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "limit")
        .cloned()
        .expect("limit");
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&json!(1), &json!(500)),
        "{limit}"
    );

    // Every documented operation is served: a call never meets the router's 404 or 405; every
    // other method on a documented path is a 405.
    let id = s.trigger("hello", json!({}));
    s.follow(&id, None);
    for (path, item) in paths {
        let concrete = path.replace("{name}", "hello").replace("{id}", &id);
        let url = s.url(&concrete);
        let item = item.as_object().expect("path item");
        for method in ["get", "post"] {
            let what = format!("{method} {path}");
            let (status, body) = call(
                &method.to_uppercase(),
                &url,
                (method == "post").then_some("{}"),
                &[("authorization", &bearer())],
            );
            if item.contains_key(method) {
                assert_ne!(status, 405, "{what} is documented but not routed: {body}");
                let no_route = body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no route"));
                assert!(!no_route, "{what} is documented but not routed: {body}");
            } else {
                assert_eq!(status, 405, "{what} is routed but not documented: {body}");
            }
        }
    }
}
