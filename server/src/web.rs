//! What every answer of the web UI shares: HTML error pages for pages (the API keeps its JSON
//! body), the security headers, gzip, and links that survive any name.

use askama::Template;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::{CompressionLayer, CompressionLevel};

/// The Content-Security-Policy of every answer: scripts and styles only from skiff's own
/// static files (no inline script, no `style` attribute), no frames, forms only to skiff.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; manifest-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// Whether a path is the API's (JSON errors) rather than a page's (HTML errors).
pub fn is_api(path: &str) -> bool {
    path == "/api"
        || path.starts_with("/api/")
        || path.starts_with("/hooks/")
        || path == "/healthz"
        || path == "/metrics"
}

/// Pages that show secrets (a new token, a sign-in) are never stored by a browser or a proxy.
fn never_stored(path: &str) -> bool {
    path == "/settings"
        || path.starts_with("/settings/")
        || path == "/login"
        || path.starts_with("/login/")
        || path == "/api/tokens"
        || path.starts_with("/api/tokens/")
}

/// Adds the security headers to every answer: the CSP, `nosniff`, no framing, the referrer
/// kept to skiff, and `Cache-Control: no-store` where secrets show. Other pages are the
/// signed-in user's own: `private, no-cache` (never in a shared cache, checked on each use).
pub async fn security_headers(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let mut response = next.run(req).await;
    let html = crate::error::content_type(&response).starts_with("text/html");
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if never_stored(&path) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    } else if html && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
    }
    response
}

/// gzip for pages, CSS, JS and JSON above 256 bytes; never for the live log stream
/// (`text/event-stream`: a compressor holds events back until its buffer fills).
pub fn compression() -> CompressionLayer<impl Predicate> {
    CompressionLayer::new()
        .gzip(true)
        .quality(CompressionLevel::Default)
        .compress_when(
            SizeAbove::new(256)
                .and(NotForContentType::SSE)
                .and(NotForContentType::IMAGES),
        )
}

/// Percent-encodes text for one path segment or query value: only RFC 3986's unreserved
/// characters stay as they are, so a pipeline named after its file (`x?y#z`) links to itself.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A way on from an error page.
pub struct Link {
    pub href: String,
    pub label: String,
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub status: u16,
    pub code: String,
    pub title: String,
    pub message: String,
    pub links: Vec<Link>,
}

/// The most bytes of an error body read to find its message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Turns every error answer of a page (a 404, a form's 403 for its CSRF token, a 409, a 405,
/// a 413...) into an HTML page that says what happened and links back; the API's answers, and
/// pages that are already HTML (a form shown again with its errors), pass as they are. Runs
/// outside `json_errors`, so what it reads is always the JSON error body.
pub async fn html_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    if is_api(&path) || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let kind = crate::error::content_type(&response);
    if kind.starts_with("text/html") {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = json["error"]["code"]
        .as_str()
        .unwrap_or(crate::error::ApiError::code_for(status))
        .to_string();
    let message = json["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
        });
    let page = error_page(status, &code, message, &method, &path);
    let html = page.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "rendering an error page");
        format!("<!doctype html><title>{status}</title><p>{status}</p><p><a href=\"/\">skiff</a>")
    });
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Response::from_parts(parts, Body::from(html))
}

/// What an error page says, and where it leads.
fn error_page(
    status: StatusCode,
    code: &str,
    message: String,
    method: &Method,
    path: &str,
) -> ErrorPage {
    let title = match (status, code) {
        (_, "csrf") => "This form has expired",
        (StatusCode::NOT_FOUND, _) => "Not found",
        (StatusCode::FORBIDDEN, _) => "Not allowed",
        (StatusCode::CONFLICT, _) => "That cannot be done now",
        (StatusCode::METHOD_NOT_ALLOWED, _) => "Not a page to open",
        (StatusCode::PAYLOAD_TOO_LARGE, _) => "Too much sent",
        (StatusCode::BAD_REQUEST, _) => "Not a valid address",
        (s, _) if s.is_server_error() => "Something went wrong in skiff",
        _ => "That did not work",
    }
    .to_string();
    let mut links = Vec::new();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Where the reader came from: the page a form was on, the run or pipeline a path names.
    match segments.as_slice() {
        ["runs", id, _action] => links.push(Link {
            href: format!("/runs/{}", encode(id)),
            label: "Back to the run".into(),
        }),
        ["pipelines", name, ..] => {
            let name = percent_decode(name);
            if status == StatusCode::NOT_FOUND {
                links.push(Link {
                    href: format!("/runs?pipeline={}", encode(&name)),
                    label: format!("Past runs of {name}"),
                });
            } else if *method != Method::GET {
                links.push(Link {
                    href: format!("/pipelines/{}", encode(&name)),
                    label: format!("Back to {name}"),
                });
            }
        }
        ["settings", ..] if *method != Method::GET => links.push(Link {
            href: "/settings".into(),
            label: "Back to the settings".into(),
        }),
        _ => {}
    }
    links.push(Link {
        href: "/runs".into(),
        label: "All runs".into(),
    });
    links.push(Link {
        href: "/".into(),
        label: "Pipelines".into(),
    });
    ErrorPage {
        status: status.as_u16(),
        code: code.to_string(),
        title,
        message,
        links,
    }
}

/// Decodes `%XX` escapes (a path segment as the router saw it); bytes that are not UTF-8 show
/// as U+FFFD.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A description's Markdown, the inline part only, as HTML: `code`, **strong**, *emphasis* and
/// [links](https://...) (http, https or a path on this server; anything else stays text).
/// The text is escaped first, so nothing in it becomes markup but these.
pub fn markdown(text: &str) -> String {
    let escaped = crate::ansi::escape(text.trim());
    let mut out = String::with_capacity(escaped.len() + 16);
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("<code>");
            out.push_str(part);
            out.push_str("</code>");
        } else {
            out.push_str(&inline(part));
        }
    }
    // An odd number of backticks: the last one opened nothing; it was dropped by `split`.
    if escaped.matches('`').count() % 2 == 1 {
        if let Some(at) = out.rfind("<code>") {
            out.replace_range(at..at + 6, "`");
        }
        if let Some(at) = out.rfind("</code>") {
            out.replace_range(at..at + 7, "");
        }
    }
    out
}

fn inline(text: &str) -> String {
    let text = pairs(text, "**", "strong");
    let text = pairs(&text, "*", "em");
    links(&text)
}

/// Wraps text between a pair of `mark`s in `<tag>` when it neither is empty nor starts or ends
/// with a space (as Markdown); other marks stay as they are.
fn pairs(text: &str, mark: &str, tag: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find(mark) {
        let after = &rest[open + mark.len()..];
        let Some(close) = after.find(mark) else {
            break;
        };
        let inner = &after[..close];
        out.push_str(&rest[..open]);
        if !inner.is_empty()
            && !inner.starts_with(char::is_whitespace)
            && !inner.ends_with(char::is_whitespace)
        {
            out.push_str(&format!("<{tag}>{inner}</{tag}>"));
            rest = &after[close + mark.len()..];
        } else {
            out.push_str(mark);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `[text](url)` with an http(s) URL or a path becomes a link.
fn links(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some((label, after)) = rest[open + 1..].split_once("](") else {
            break;
        };
        let Some((url, tail)) = after.split_once(')') else {
            break;
        };
        let safe =
            (url.starts_with("https://") || url.starts_with("http://") || url.starts_with('/'))
                && !url.starts_with("//")
                && !url.contains(char::is_whitespace)
                && !label.contains('[');
        out.push_str(&rest[..open]);
        if safe {
            out.push_str(&format!("<a href=\"{url}\">{label}</a>"));
        } else {
            out.push_str(&rest[open..open + 1 + label.len() + 2 + url.len() + 1]);
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_for_links() {
        assert_eq!(encode("x?y#z"), "x%3Fy%23z");
        assert_eq!(encode("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(encode("build-push_deploy.v2~"), "build-push_deploy.v2~");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(percent_decode(&encode("x?y#z é")), "x?y#z é");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn api_paths_are_not_pages() {
        for p in ["/api/runs", "/api", "/healthz", "/metrics"] {
            assert!(is_api(p), "{p}");
        }
        for p in ["/", "/runs", "/apix", "/api-docs", "/pipelines/api"] {
            assert!(!is_api(p), "{p}");
        }
    }

    #[test]
    fn markdown_renders_a_safe_inline_subset() {
        assert_eq!(
            markdown("Deploys `main` to **prod**, *carefully*"),
            "Deploys <code>main</code> to <strong>prod</strong>, <em>carefully</em>"
        );
        assert_eq!(
            markdown("<script>alert(1)</script> `<b>`"),
            "&lt;script&gt;alert(1)&lt;/script&gt; <code>&lt;b&gt;</code>"
        );
        assert_eq!(
            markdown("see [the docs](https://example.org/a?b=1&c=2) or [x](javascript:alert(1))"),
            "see <a href=\"https://example.org/a?b=1&amp;c=2\">the docs</a> or [x](javascript:alert(1))"
        );
        assert_eq!(
            markdown("[q](https://x.org/\"onmouseover=1)"),
            "<a href=\"https://x.org/&quot;onmouseover=1\">q</a>"
        );
        assert_eq!(markdown("a * b and `c"), "a * b and `c");
        assert_eq!(markdown("2 ** 3"), "2 ** 3");
    }
}
