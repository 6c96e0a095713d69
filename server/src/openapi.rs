//! `/api/openapi.json`: the API described for the people and tools that script against it.
//!
//! The document is generated: each route's operation comes from its handler's
//! `#[utoipa::path]` (registered with `utoipa_axum::routes!`, so a route and its description
//! are added in one place), the schemas from the wire types in `api.rs` and `error.rs`. What
//! every route shares is added here, from the same facts the code acts on: the `Auth` extractor
//! answers 401 on every route but `/healthz`, and 403 on a session's state-changing request
//! without its CSRF token; a path parameter that does not decode is a 400; the Store can fail.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

use axum::http::Method;

use crate::auth::{Auth, CSRF_HEADER, SESSION_COOKIE, Scope, changes_state, required_scope};
use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "skiff",
        description = "Trigger and follow pipeline runs. Every route but `/healthz` needs \
            `Authorization: Bearer <token>` (an API token, or `SKIFF_ADMIN_TOKEN`) or a UI session \
            cookie; a session's POSTs also carry its `X-CSRF-Token`. Every error is \
            `{\"error\": {\"code\", \"message\", \"fields\"?}}`."
    ),
    components(schemas(ErrorBody, crate::api::StreamFormat)),
    tags(
        (name = "pipelines", description = "The pipelines folder"),
        (name = "runs", description = "Starting, listing, cancelling runs"),
        (name = "logs", description = "Run logs, read or followed live"),
        (name = "tokens", description = "API tokens"),
        (name = "services", description = "The services runs deployed (from the resources ledger)"),
        (name = "workers", description = "Who executes runs: their labels, capabilities, beats and runs"),
        (name = "server", description = "Health, metrics, this document"),
    )
)]
struct Base;

/// The document's start: info, tags, the error schema. Routes add their paths to it.
pub fn base() -> utoipa::openapi::OpenApi {
    Base::openapi()
}

/// The whole document.
pub fn spec() -> utoipa::openapi::OpenApi {
    let mut doc = crate::api_routes().into_openapi();
    add_shared(&mut doc);
    doc
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "server",
    responses((status = 200, description = "the OpenAPI 3.1 document", body = Object)))]
pub async fn document(_auth: Auth) -> Response {
    static TEXT: OnceLock<String> = OnceLock::new();
    let text = TEXT.get_or_init(|| serde_json::to_string(&spec()).unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str()).into_response()
}

fn error(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// Adds `status` unless the handler documents it itself.
fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::T(error(description)));
}

fn add_shared(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "an API token (Settings or POST /api/tokens) or SKIFF_ADMIN_TOKEN",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "session",
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
            SESSION_COOKIE,
            "the web UI's session (HttpOnly, SameSite=Strict)",
        ))),
    );
    components.add_security_scheme(
        "csrf",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-CSRF-Token",
            "the session's CSRF token, on every state-changing request made with a session",
        ))),
    );
    debug_assert!("X-CSRF-Token".eq_ignore_ascii_case(CSRF_HEADER));
    // A token's scope is the bearer requirement's role: the same rule the server applies
    // (`auth::required_scope`).
    let read = |scope: Scope| {
        vec![
            SecurityRequirement::new("bearer", [scope.as_str()]),
            SecurityRequirement::new("session", Vec::<String>::new()),
        ]
    };
    let write = |scope: Scope| {
        vec![
            SecurityRequirement::new("bearer", [scope.as_str()]),
            SecurityRequirement::new("session", Vec::<String>::new())
                .add("csrf", Vec::<String>::new()),
        ]
    };
    doc.security = Some(read(Scope::Read));
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            (&mut item.get, Method::GET),
            (&mut item.head, Method::HEAD),
            (&mut item.options, Method::OPTIONS),
            (&mut item.post, Method::POST),
            (&mut item.put, Method::PUT),
            (&mut item.patch, Method::PATCH),
            (&mut item.delete, Method::DELETE),
        ];
        for (op, method) in ops {
            let changes = changes_state(&method);
            let scope = required_scope(&method, path);
            let Some(op) = op.as_mut() else { continue };
            if path == "/healthz" {
                op.security = Some(Vec::new());
                continue;
            }
            if path.starts_with("/hooks/") {
                // Checked by the delivery's signature, not by a session or a token.
                op.security = Some(Vec::new());
                add(op, "500", "an internal error (see the server's log)");
                continue;
            }
            add(op, "401", "no credentials, or wrong ones");
            let needs = format!(
                "Needs a token with scope `{}` (or a session).",
                scope.as_str()
            );
            op.description = Some(match op.description.take() {
                Some(d) if !d.is_empty() => format!("{d}\n\n{needs}"),
                _ => needs,
            });
            if changes {
                op.security = Some(write(scope));
                add(
                    op,
                    "403",
                    "a token whose scope does not allow this (`insufficient_scope`), or a \
                     session's request without its X-CSRF-Token (or with a wrong one)",
                );
            } else {
                op.security = Some(read(scope));
                add(
                    op,
                    "403",
                    "a token whose scope does not allow this (`insufficient_scope`)",
                );
            }
            if path.contains('{') {
                add(op, "400", "a path parameter that is not UTF-8 once decoded");
            }
            add(op, "500", "an internal error (see the server's log)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every path of a router, read from its `Debug` text (axum has no other way to list them).
    fn router_paths(router: &axum::Router<crate::AppState>) -> BTreeSet<String> {
        let text = format!("{router:?}");
        let mut paths = BTreeSet::new();
        for piece in text.split('"').skip(1).step_by(2) {
            if piece.starts_with('/') && !piece.contains("__private__") {
                paths.insert(piece.to_string());
            }
        }
        paths
    }

    #[test]
    fn every_route_is_documented_or_a_page() {
        let routes = router_paths(&crate::routes());
        assert!(
            routes.contains("/api/runs/{id}") && routes.contains("/settings"),
            "the router's paths are read: {routes:?}"
        );
        let doc = super::spec();
        let documented: BTreeSet<String> = doc.paths.paths.keys().cloned().collect();
        let undocumented: Vec<&String> = routes
            .iter()
            .filter(|p| crate::web::is_api(p))
            .filter(|p| !documented.contains(*p))
            .collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the OpenAPI document: {undocumented:?}"
        );
        let unrouted: Vec<&String> = documented.difference(&routes).collect();
        assert!(
            unrouted.is_empty(),
            "documented but not routed: {unrouted:?}"
        );
        // The pages are the UI's: no API route hides among them.
        let pages: Vec<&String> = routes.difference(&documented).collect();
        assert!(pages.iter().all(|p| !crate::web::is_api(p)), "{pages:?}");
    }
}
