//! The one error type at the HTTP edge: a JSON body, the right status, internals logged once.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use skiff_core::dispatch::DispatchError;
use skiff_core::pipeline::ParamError;
use skiff_core::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<ParamError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "sign in, or send `Authorization: Bearer <token>`",
        )
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": { "code": self.code, "message": self.message } });
        if !self.fields.is_empty() {
            body["error"]["fields"] = json!(self.fields);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::not_found(format!("no run {id}")),
            StoreError::OffsetOutOfRange { offset, len } => ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "bad_offset",
                format!("offset {offset} is past the end of the log ({len} bytes)"),
            ),
            StoreError::BadCursor(c) => ApiError::bad_request(format!("bad cursor `{c}`")),
            StoreError::InvalidTransition { from, .. } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("the run is {from}"),
            ),
            other => ApiError::internal("store", other),
        }
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Params(fields) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "invalid_params",
                message: "the params do not fit the pipeline".into(),
                fields,
            },
            DispatchError::InvalidPipeline(name) => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_pipeline",
                format!("pipeline `{name}` is not valid; fix its file first"),
            ),
            DispatchError::BadSnapshot(id) => ApiError::new(
                StatusCode::CONFLICT,
                "bad_snapshot",
                format!("run {id}'s pipeline snapshot no longer loads"),
            ),
            DispatchError::Store(e) => e.into(),
            DispatchError::Queue(e) => ApiError::internal("queue", e),
        }
    }
}

/// Turns axum's JSON rejections (plain text) into JSON errors with the right status.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        let status = r.status();
        let code = match &r {
            J::MissingJsonContentType(_) => "unsupported_media_type",
            J::JsonSyntaxError(_) => "malformed_json",
            J::JsonDataError(_) => "invalid_body",
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            _ => "bad_request",
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}
