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
