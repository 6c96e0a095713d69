//! The web UI over HTTP: error pages in HTML (the API keeps JSON), the security headers, gzip
//! (never on the live stream), links that survive odd pipeline names, sign-in from a deep link.

use std::io::{Read, Write};

use serde_json::json;

use crate::api::{csrf_of, sign_in};
use crate::harness::{Server, eventually, raw};

const HELLO: &str = "params:\n  who: { default: world }\nsteps:\n  - id: greet\n    run: echo \"hello $SKIFF_PARAM_WHO\"\n";

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Asserts that a response is an HTML error page with `status` and `code`, a message, and a
/// link back to the pipelines.
pub fn assert_html_error(
    what: &str,
    (status, headers, body): &(u16, Vec<(String, String)>, String),
    want: u16,
    code: &str,
) {
    assert_eq!(*status, want, "{what}: {body}");
    assert!(
        header(headers, "content-type").is_some_and(|t| t.starts_with("text/html")),
        "{what}: content-type {:?}, body {body:?}",
        header(headers, "content-type")
    );
    assert!(
        body.contains(&format!("data-status=\"{want}\""))
            && body.contains(&format!("data-code=\"{code}\"")),
        "{what}: not the error page for {want} {code}: {body}"
    );
    let message = body
        .split("<p id=\"error-message\">")
        .nth(1)
        .and_then(|m| m.split("</p>").next())
        .unwrap_or("");
    assert!(!message.trim().is_empty(), "{what}: no message: {body}");
    assert!(
        body.contains("<a href=\"/\">"),
        "{what}: no way back: {body}"
    );
}

/// A form POST with the session cookie.
fn form(s: &Server, cookie: &str, path: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    raw(
        "POST",
        &s.url(path),
        Some(body),
        &[
            ("cookie", cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    )
}

#[test]
fn pages_answer_errors_in_html_and_the_api_in_json() {
    let s = Server::start(&[("hello", HELLO), ("broken", "name: broken\nstpes: []\n")]);
    let cookie = sign_in(&s);
    let get = |path: &str| raw("GET", &s.url(path), None, &[("cookie", &cookie)]);
    assert_html_error("unknown page", &get("/no/such/page"), 404, "not_found");
    assert_html_error(
        "unknown run",
        &get("/runs/0190f1d2-7a2b-7c3d-8e4f-0123456789ab"),
        404,
        "not_found",
    );
    assert_html_error("not a run id", &get("/runs/nope"), 404, "not_found");
    assert_html_error(
        "unknown pipeline",
        &get("/pipelines/nope"),
        404,
        "not_found",
    );
    // A form without its CSRF token: a page that says so, and leads back to the form's page.
    let (_, _, dash) = get("/");
    let csrf = csrf_of(&dash);
    let refused = form(&s, &cookie, "/pipelines/hello/run", "csrf=wrong");
    assert_html_error("CSRF", &refused, 403, "csrf");
    assert!(
        refused.2.contains("href=\"/pipelines/hello\""),
        "back to the form: {}",
        refused.2
    );
    // Running an invalid pipeline: 409.
    assert_html_error(
        "invalid pipeline",
        &form(
            &s,
            &cookie,
            "/pipelines/broken/run",
            &format!("csrf={csrf}"),
        ),
        409,
        "invalid_pipeline",
    );
    // The API keeps its JSON, with the same cookie.
    let (status, headers, body) = get("/api/runs/nope");
    assert_eq!(status, 404);
    assert!(
        header(&headers, "content-type").is_some_and(|t| t.starts_with("application/json")),
        "{body}"
    );
    // A run whose pipeline was removed: its page still shows; the pipeline's address says the
    // pipeline is gone and leads to its past runs.
    let (run, _) = s.run_and_wait("hello", json!({}));
    let id = run["id"].as_str().expect("id");
    std::fs::remove_file(s.pipelines_dir().join("hello.yml")).expect("remove");
    eventually("the pipeline to be gone", || {
        s.api("GET", "/api/pipelines/hello", None).0 == 404
    });
    let (status, _, page) = get(&format!("/runs/{id}"));
    assert_eq!(status, 200, "{page}");
    let gone = get("/pipelines/hello");
    assert_html_error("removed pipeline", &gone, 404, "not_found");
    assert!(
        gone.2.contains("href=\"/runs?pipeline=hello\""),
        "the removed pipeline's runs are a link away: {}",
        gone.2
    );
}

/// One GET over a plain connection, the bytes as sent: status line and headers (lower-case
/// names), and the body with any chunked framing removed.
fn get_bytes(
    s: &Server,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let addr = s.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut body = answer[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let heads: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if header(&heads, "transfer-encoding") == Some("chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .expect("a chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    (status, heads, body)
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("a gzip body");
    text
}

#[test]
fn every_answer_has_security_headers_and_pages_are_gzipped_but_not_the_live_stream() {
    let s = Server::start(&[("hello", HELLO)]);
    let cookie = sign_in(&s);
    let (run, _) = s.run_and_wait("hello", json!({}));
    let id = run["id"].as_str().expect("id").to_string();
    let gzip = [("cookie", cookie.as_str()), ("accept-encoding", "gzip")];
    let mut sizes = Vec::new();
    for path in [
        "/".to_string(),
        "/pipelines/hello".to_string(),
        format!("/runs/{id}"),
        "/settings".to_string(),
        "/static/app.css".to_string(),
        "/static/run.js".to_string(),
        "/no/such/page".to_string(),
    ] {
        let (status, headers, body) = get_bytes(&s, &path, &gzip);
        assert!(status == 200 || status == 404, "{path}: {status}");
        let csp = header(&headers, "content-security-policy").unwrap_or("");
        for part in [
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{path}: CSP {csp:?} lacks {part}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(
            header(&headers, "x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(header(&headers, "x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(header(&headers, "content-encoding"), Some("gzip"), "{path}");
        let text = gunzip(&body);
        assert!(!text.is_empty(), "{path}");
        if path != "/static/app.css" && path != "/static/run.js" {
            assert!(!text.contains("<script>"), "{path}: an inline script");
            assert!(!text.contains(" style=\""), "{path}: an inline style");
        }
        sizes.push(format!("{path}: {} -> {} bytes", text.len(), body.len()));
    }
    eprintln!("gzipped: {}", sizes.join("; "));
    // Pages that show secrets are never stored.
    let (_, headers, _) = get_bytes(&s, "/settings", &gzip);
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    let (_, headers, _) = get_bytes(&s, "/login", &[]);
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    // Without Accept-Encoding, nothing is compressed.
    let (_, headers, body) = get_bytes(&s, "/", &[("cookie", cookie.as_str())]);
    assert_eq!(header(&headers, "content-encoding"), None);
    assert!(String::from_utf8_lossy(&body).contains("hello"));
    // The live stream is never compressed (a compressor would hold its events back).
    let (status, headers, body) = get_bytes(
        &s,
        &format!("/api/runs/{id}/logs/stream?format=html"),
        &gzip,
    );
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/event-stream"),
        "{headers:?}"
    );
    assert_eq!(header(&headers, "content-encoding"), None, "{headers:?}");
    assert!(String::from_utf8_lossy(&body).contains("event: end"));
}

#[test]
fn links_to_pipelines_with_odd_names_are_encoded() {
    let s = Server::start(&[("x?y#z", "stpes: []\n"), ("a b", HELLO)]);
    let cookie = sign_in(&s);
    let (status, _, page) = raw("GET", &s.url("/"), None, &[("cookie", &cookie)]);
    assert_eq!(status, 200);
    assert!(
        page.contains("href=\"/pipelines/x%3Fy%23z\""),
        "the invalid pipeline's link is encoded: {page}"
    );
    assert!(page.contains("href=\"/pipelines/a%20b\""), "{page}");
    let (status, _, page) = raw(
        "GET",
        &s.url("/pipelines/x%3Fy%23z"),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!(status, 200, "the link leads to the pipeline: {page}");
    assert!(page.contains("This pipeline is invalid"), "{page}");
}

fn location(headers: &[(String, String)]) -> String {
    header(headers, "location").unwrap_or("").to_string()
}

#[test]
fn signing_in_from_a_deep_link_lands_there_and_only_on_this_server() {
    let s = Server::start(&[("hello", HELLO)]);
    // A page asked for without a session: sent to sign in, with where it was going.
    let (status, headers, _) = raw("GET", &s.url("/runs?status=failed"), None, &[]);
    assert_eq!(status, 303);
    assert_eq!(location(&headers), "/login?next=%2Fruns%3Fstatus%3Dfailed");
    // Set a password (through a session) to sign in with.
    let cookie = sign_in(&s);
    let (_, _, page) = raw("GET", &s.url("/settings"), None, &[("cookie", &cookie)]);
    let csrf = csrf_of(&page);
    let (status, _, page) = form(
        &s,
        &cookie,
        "/settings/password",
        &format!("csrf={csrf}&password=deep-link-123&confirm=deep-link-123"),
    );
    assert_eq!(status, 200, "{page}");
    // The form carries `next` on.
    let (_, _, page) = raw(
        "GET",
        &s.url("/login?next=%2Fruns%3Fstatus%3Dfailed"),
        None,
        &[],
    );
    assert!(
        page.contains("name=\"next\" value=\"/runs?status=failed\""),
        "{page}"
    );
    let login = |next: &str| {
        let body = format!(
            "password=deep-link-123&next={}",
            next.replace('%', "%25")
                .replace('&', "%26")
                .replace('?', "%3F")
                .replace('\\', "%5C")
        );
        let (status, headers, page) = raw(
            "POST",
            &s.url("/login"),
            Some(&body),
            &[("content-type", "application/x-www-form-urlencoded")],
        );
        assert_eq!(status, 303, "{next}: {page}");
        location(&headers)
    };
    assert_eq!(login("/runs?status=failed"), "/runs?status=failed");
    assert_eq!(login("/pipelines/hello"), "/pipelines/hello");
    for evil in [
        "//evil.com",
        "/\\evil.com",
        "https://evil.com/",
        "evil.com",
        "/\\/evil.com",
        "/a\\b",
        "",
        "/%0d%0aSet-Cookie:x=1",
    ] {
        let to = login(evil);
        assert!(
            to == "/" || (evil.starts_with("/%") && to == evil),
            "{evil:?} led to {to:?}"
        );
    }
    // A line break or a space never reaches the Location header (no panic, no header split).
    let (status, headers, _) = raw(
        "POST",
        &s.url("/login"),
        Some("password=deep-link-123&next=/x%0d%0aSet-Cookie:%20a=b"),
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    assert_eq!((status, location(&headers).as_str()), (303, "/"));
    // Signed in, /login goes home (or on to `next`).
    let (status, headers, _) = raw("GET", &s.url("/login"), None, &[("cookie", &cookie)]);
    assert_eq!((status, location(&headers).as_str()), (303, "/"));
    let (status, headers, _) = raw(
        "GET",
        &s.url("/login?next=//evil.com"),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!((status, location(&headers).as_str()), (303, "/"));
}

#[test]
fn a_new_token_is_shown_once_after_a_redirect_and_a_revoked_one_looks_revoked() {
    let s = Server::start(&[("hello", HELLO)]);
    let cookie = sign_in(&s);
    let (_, _, page) = raw("GET", &s.url("/settings"), None, &[("cookie", &cookie)]);
    let csrf = csrf_of(&page);
    let (status, headers, _) = form(
        &s,
        &cookie,
        "/settings/tokens",
        &format!("csrf={csrf}&name=ci&scope=read"),
    );
    assert_eq!((status, location(&headers).as_str()), (303, "/settings"));
    let flash = headers
        .iter()
        .find(|(k, v)| k == "set-cookie" && v.starts_with("skiff_new_token="))
        .map(|(_, v)| v.clone())
        .expect("the new token travels to the next page");
    assert!(
        flash.contains("HttpOnly") && flash.contains("Path=/settings"),
        "{flash}"
    );
    let flash = flash.split(';').next().unwrap_or("").to_string();
    let both = format!("{cookie}; {flash}");
    let (status, headers, page) = raw("GET", &s.url("/settings"), None, &[("cookie", &both)]);
    assert_eq!(status, 200);
    let secret = page
        .split("<code id=\"new-token\" class=\"secret\">")
        .nth(1)
        .and_then(|t| t.split('<').next())
        .expect("the token is shown")
        .to_string();
    assert!(secret.starts_with("skiff_"), "{secret}");
    assert!(page.contains("data-copy=\"new-token\""), "a copy button");
    assert!(page.contains("message ok"), "success looks like success");
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "set-cookie" && v.starts_with("skiff_new_token=;")),
        "the flash is cleared: {headers:?}"
    );
    // It works, with its scope.
    let (status, _) = crate::harness::call(
        "GET",
        &s.url("/api/runs"),
        None,
        &[("authorization", &format!("Bearer {secret}"))],
    );
    assert_eq!(status, 200);
    // A reload (the browser no longer sends the cleared cookie) shows no token and makes none.
    let (_, _, page) = raw("GET", &s.url("/settings"), None, &[("cookie", &cookie)]);
    assert!(!page.contains(&secret) && !page.contains("id=\"new-token\""));
    let (_, tokens) = s.api("GET", "/api/tokens", None);
    assert_eq!(
        tokens["tokens"].as_array().map(Vec::len),
        Some(1),
        "{tokens}"
    );
    // Revoked: marked so.
    let id = tokens["tokens"][0]["id"].as_str().expect("id").to_string();
    let (status, _, _) = form(
        &s,
        &cookie,
        &format!("/settings/tokens/{id}/revoke"),
        &format!("csrf={csrf}"),
    );
    assert_eq!(status, 303);
    let (_, _, page) = raw("GET", &s.url("/settings"), None, &[("cookie", &cookie)]);
    assert!(
        page.contains("class=\"token revoked\"") && page.contains("revoked-badge"),
        "{page}"
    );
    // A bad name: an error that looks like one.
    let (status, _, page) = form(
        &s,
        &cookie,
        "/settings/tokens",
        &format!("csrf={csrf}&name="),
    );
    assert_eq!(status, 422);
    assert!(page.contains("message error"), "{page}");
}

#[test]
fn the_runs_page_filters_by_pipeline_status_and_trigger_and_pages() {
    let s = Server::start(&[
        ("quick", "steps:\n  - run: \"true\"\n"),
        ("sad", "steps:\n  - run: exit 3\n"),
    ]);
    let cookie = sign_in(&s);
    let mut last = String::new();
    for _ in 0..52 {
        last = s.trigger("quick", json!({}));
    }
    s.wait_for_end(&last);
    let (sad, _) = s.run_and_wait("sad", json!({}));
    let sad_id = sad["id"].as_str().expect("id");
    let (status, rerun) = s.api("POST", &format!("/api/runs/{sad_id}/rerun"), Some("{}"));
    assert!(status == 201 || status == 200, "{rerun}");
    s.wait_for_end(rerun["id"].as_str().expect("id"));
    let get = |path: &str| {
        let (status, _, page) = raw("GET", &s.url(path), None, &[("cookie", &cookie)]);
        assert_eq!(status, 200, "{path}: {page}");
        page
    };
    let rows = |page: &str| page.matches("class=\"run-row ").count();
    // All runs, 50 a page, newest first: the rerun on top.
    let page = get("/runs");
    assert_eq!(rows(&page), 50);
    assert!(page.contains("id=\"older\""), "a next page");
    // By pipeline, paged with the cursor.
    let page = get("/runs?pipeline=quick");
    assert_eq!(rows(&page), 50);
    let older = page
        .split("id=\"older\" href=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .expect("older")
        .replace("&amp;", "&")
        .replace("&#38;", "&");
    assert!(older.starts_with("/runs?pipeline=quick&cursor="), "{older}");
    let page = get(&older);
    assert_eq!(rows(&page), 2, "the rest");
    assert!(!page.contains("id=\"older\""));
    // By status and by trigger.
    let page = get("/runs?status=failed");
    assert_eq!(rows(&page), 2, "{page}");
    assert!(!page.contains("run-row succeeded"));
    let page = get("/runs?trigger=rerun");
    assert_eq!(rows(&page), 1, "{page}");
    let page = get("/runs?trigger=api&pipeline=sad");
    assert_eq!(rows(&page), 1, "{page}");
    let page = get("/runs?status=queued");
    assert!(page.contains("id=\"no-runs\""), "{page}");
    // A removed pipeline's runs still list; bad filters are an HTML 400.
    assert_html_error(
        "bad status",
        &raw(
            "GET",
            &s.url("/runs?status=nope"),
            None,
            &[("cookie", &cookie)],
        ),
        400,
        "bad_request",
    );
    assert_html_error(
        "bad cursor",
        &raw(
            "GET",
            &s.url("/runs?cursor=%FF%FE"),
            None,
            &[("cookie", &cookie)],
        ),
        400,
        "bad_request",
    );
    // The dashboard shows what is running now (nothing, here), and the favicon is there.
    let page = get("/");
    assert!(page.contains("id=\"active\""), "{page}");
    let (status, headers, _) = raw("GET", &s.url("/favicon.ico"), None, &[]);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("image/svg+xml"));
}
