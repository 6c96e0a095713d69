//! Authentication that holds: a token does what its scope allows and no more, the password and
//! settings need a signed-in session and the current password, and a password change signs
//! everyone else out.

use serde_json::{Value, json};

use crate::api::{csrf_of, sign_in};
use crate::harness::{Server, call, raw};

const HELLO: &str = "steps:\n  - run: echo hello\n";

fn token(s: &Server, name: &str, scope: Option<&str>) -> String {
    let body = match scope {
        Some(scope) => json!({ "name": name, "scope": scope }),
        None => json!({ "name": name }),
    };
    let (status, created) = s.api("POST", "/api/tokens", Some(&body.to_string()));
    assert_eq!(status, 201, "{created}");
    created["token"].as_str().expect("secret").to_string()
}

fn with(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn a_token_does_what_its_scope_allows_and_no_more() {
    let s = Server::start(&[("hello", HELLO)]);
    let read = token(&s, "dashboard", Some("read"));
    let run = token(&s, "ci", None);
    let admin = token(&s, "ops", Some("admin"));
    let (_, list) = s.api("GET", "/api/tokens", None);
    let scopes: Vec<(&str, &str)> = list["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or(""),
                t["scope"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        scopes,
        [("ops", "admin"), ("ci", "run"), ("dashboard", "read")]
    );
    let go = |token: &str, method: &str, path: &str, body: Option<&str>| -> (u16, Value) {
        call(
            method,
            &s.url(path),
            body,
            &[("authorization", &with(token))],
        )
    };
    // read: reads only.
    assert_eq!(go(&read, "GET", "/api/runs", None).0, 200);
    let (status, body) = go(&read, "POST", "/api/pipelines/hello/runs", Some("{}"));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("insufficient_scope"))
    );
    // run: starts runs, but manages no tokens.
    let (status, run_body) = go(&run, "POST", "/api/pipelines/hello/runs", Some("{}"));
    assert_eq!(status, 201, "{run_body}");
    for (method, path, body) in [
        ("GET", "/api/tokens", None),
        ("POST", "/api/tokens", Some(r#"{"name": "more"}"#)),
    ] {
        let (status, body) = go(&run, method, path, body);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("insufficient_scope")),
            "{method} {path}"
        );
    }
    // admin: manages tokens.
    assert_eq!(go(&admin, "GET", "/api/tokens", None).0, 200);
    let (status, body) = go(
        &admin,
        "POST",
        "/api/tokens",
        Some(r#"{"name": "x", "scope": "root"}"#),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_scope"))
    );
    // No token, whatever its scope, reaches the settings.
    for t in [&read, &run, &admin] {
        let (status, _, page) = raw(
            "POST",
            &s.url("/settings/password"),
            Some("password=taken-over-123&confirm=taken-over-123"),
            &[
                ("authorization", &with(t)),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        );
        assert_eq!(status, 403, "{page}");
        let (status, _, _) = raw(
            "GET",
            &s.url("/settings"),
            None,
            &[("authorization", &with(t))],
        );
        assert_eq!(status, 403);
    }
    // The OpenAPI document says which scope each operation needs.
    let (_, doc) = s.api("GET", "/api/openapi.json", None);
    let needs = |path: &str, method: &str| {
        doc["paths"][path][method]["security"][0]["bearer"][0]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(needs("/api/runs", "get"), "read");
    assert_eq!(needs("/api/pipelines/{name}/runs", "post"), "run");
    assert_eq!(needs("/api/tokens", "post"), "admin");
}

#[test]
fn a_password_change_needs_the_current_one_and_signs_everyone_else_out() {
    let s = Server::start(&[("hello", HELLO)]);
    let first = sign_in(&s);
    let form = |cookie: &str, body: &str| {
        raw(
            "POST",
            &s.url("/settings/password"),
            Some(body),
            &[
                ("cookie", cookie),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
    };
    let csrf_for = |cookie: &str| {
        let (_, _, page) = raw("GET", &s.url("/settings"), None, &[("cookie", cookie)]);
        csrf_of(&page)
    };
    let csrf = csrf_for(&first);
    let (status, _, page) = form(
        &first,
        &format!("csrf={csrf}&password=first-pass-123&confirm=first-pass-123"),
    );
    assert_eq!(status, 200, "{page}");
    // A second session, signed in with the password.
    let (status, headers, _) = raw(
        "POST",
        &s.url("/login"),
        Some("password=first-pass-123"),
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(status, 303);
    let second = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .and_then(|(_, v)| v.split(';').next())
        .expect("a session")
        .to_string();
    // Without the current password, or with a wrong one: refused.
    let csrf2 = csrf_for(&second);
    for current in ["", "&current=not-it-at-all"] {
        let (status, _, page) = form(
            &second,
            &format!("csrf={csrf2}{current}&password=second-pass-123&confirm=second-pass-123"),
        );
        assert_eq!(status, 403, "{page}");
        assert!(page.contains("current password is wrong"), "{page}");
    }
    // With it: changed, and the first session is signed out; the second stays.
    let (status, _, page) = form(
        &second,
        &format!(
            "csrf={csrf2}&current=first-pass-123&password=second-pass-123&confirm=second-pass-123"
        ),
    );
    assert_eq!(status, 200, "{page}");
    let (status, _, _) = raw("GET", &s.url("/settings"), None, &[("cookie", &first)]);
    assert_eq!(status, 303, "the other session was signed out");
    let (status, _) = call("GET", &s.url("/api/runs"), None, &[("cookie", &first)]);
    assert_eq!(status, 401);
    let (status, _, _) = raw("GET", &s.url("/settings"), None, &[("cookie", &second)]);
    assert_eq!(status, 200);
}
