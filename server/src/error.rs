//! The one error type at the HTTP edge: a JSON body, the right status, internals logged once.
//! Also the extractors the API uses instead of axum's own (their rejections are this error, not
//! axum's plain text), and the layer that gives the few answers no handler makes (a rejection in
//! a UI handler, say) the same JSON body.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::{DeserializeOwned, Visitor};
use skiff_core::dispatch::DispatchError;
use skiff_core::pipeline::ParamError;
use skiff_core::run::TriggerKind;
use skiff_core::store::StoreError;
use utoipa::ToSchema;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<ParamError>,
}

/// Every error the server answers: `{"error": {"code", "message", "fields"?}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable word: `bad_request`, `unauthorized`, `csrf`, `not_found`,
    /// `method_not_allowed`, `malformed_json`, `invalid_body`, `invalid_params`, `too_large`,
    /// `unsupported_media_type`, `bad_offset`, `already_ended`, `invalid_pipeline`, `internal`...
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// One entry per param that does not fit (`invalid_params` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<FieldError>>,
}

/// A problem with one param.
#[derive(Serialize, ToSchema)]
pub struct FieldError {
    /// The param's name.
    pub param: String,
    pub message: String,
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

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
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

    /// The params do not fit the pipeline; `fields` says how, param by param.
    pub fn invalid_params(fields: Vec<ParamError>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_params",
            message: "the params do not fit the pipeline".into(),
            fields,
        }
    }

    /// The code of an error that only its status describes.
    pub fn code_for(status: StatusCode) -> &'static str {
        match status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::RANGE_NOT_SATISFIABLE => "bad_offset",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
            s if s.is_server_error() => "internal",
            _ => "error",
        }
    }

    /// An error from axum's own machinery (a rejection), whose text is its message.
    fn from_status(status: StatusCode, message: String) -> Self {
        Self::new(status, Self::code_for(status), message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                fields: (!self.fields.is_empty()).then(|| {
                    self.fields
                        .iter()
                        .map(|f| FieldError {
                            param: f.param.clone(),
                            message: f.message.clone(),
                        })
                        .collect()
                }),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
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
            DispatchError::Params(fields) => ApiError::invalid_params(fields),
            e @ DispatchError::NotAccepted { .. } => {
                let code = match &e {
                    DispatchError::NotAccepted {
                        kind: TriggerKind::Manual | TriggerKind::Api | TriggerKind::Cli,
                        ..
                    } => "manual_disabled",
                    _ => "trigger_not_accepted",
                };
                ApiError::new(StatusCode::CONFLICT, code, e.to_string())
            }
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
            e @ DispatchError::Group { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_group",
                e.to_string(),
            ),
            DispatchError::Store(e) => e.into(),
            DispatchError::Queue(e) => ApiError::internal("queue", e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = match &r {
            JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
            JsonRejection::JsonSyntaxError(_) => "malformed_json",
            JsonRejection::JsonDataError(_) => "invalid_body",
            _ => Self::code_for(r.status()),
        };
        ApiError::new(r.status(), code, r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        Self::from_status(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::from_status(r.status(), r.body_text())
    }
}

// ---- extractors ----

/// `axum::extract::Path`, rejected with the JSON error body.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query`, rejected with the JSON error body.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// A JSON body that must be an object. serde's derived `Deserialize` for a struct also accepts a
/// JSON array (its fields by position), so `[{"who": "x"}]` used to pass for
/// `{"params": {"who": "x"}}`: here the body is read as a map, nothing else. Refusals:
/// 415 without a JSON content type, 413 past the body limit, 400 for text that is not JSON,
/// 422 for JSON of the wrong shape (an array, an unknown field...).
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON, with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(req, state).await?;
        parse_object(&bytes).map(JsonObject)
    }
}

/// Whether the content type is `application/json` or `application/<something>+json`.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence
        .strip_prefix("application/")
        .is_some_and(|sub| sub == "json" || sub.ends_with("+json"))
}

/// Parses a JSON object into `T` (see [`JsonObject`]).
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(ObjectOnly(&mut de)).and_then(|v| de.end().map(|()| v));
    value.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("the body must be a JSON object of the documented shape: {e}"),
        ),
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        ),
    })
}

/// A deserializer that gives a struct only a map: `deserialize_struct` becomes
/// `deserialize_map`, so a JSON array is "invalid type: sequence, expected struct ...". Only the
/// top level goes through it; what the struct holds is read by serde_json itself.
struct ObjectOnly<D>(D);

macro_rules! forward {
    ($($method:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method(visitor)
        })*
    };
}

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple_struct(name, len, visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

// ---- what no handler answers ----

/// The 405 of every route (axum adds the `Allow` header).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; see the Allow header",
            uri.path()
        ),
    )
}

/// The most bytes of a plain-text error that are kept as its message.
const MAX_PLAIN_ERROR: usize = 16 << 10;

/// A response's content type, lowercased ("" when it has none).
pub fn content_type(response: &Response) -> String {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Turns an error answer that is not JSON (axum's plain-text rejections in handlers that do not
/// use the extractors above, such as the UI's forms) into the JSON error body, keeping the status
/// and the other headers. HTML pages (the UI's own error pages) and JSON pass as they are.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let kind = content_type(&response);
    if kind.starts_with("application/json") || kind.starts_with("text/html") {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_ERROR)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let fresh = ApiError::from_status(status, message).into_response();
    let (fresh_parts, body) = fresh.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &fresh_parts.headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        name: String,
    }

    #[test]
    fn only_an_object_is_a_body() {
        assert_eq!(
            parse_object::<Body>(br#" {"name": "x"} "#).ok(),
            Some(Body { name: "x".into() })
        );
        for (text, status, code) in [
            (r#"["x"]"#, 422, "invalid_body"),
            ("[]", 422, "invalid_body"),
            ("null", 422, "invalid_body"),
            ("7", 422, "invalid_body"),
            (r#"{"nmae": "x"}"#, 422, "invalid_body"),
            (r#"{"name": 1}"#, 422, "invalid_body"),
            (r#"{"name": "#, 400, "malformed_json"),
            (r#"{"name": "x"} {}"#, 400, "malformed_json"),
            ("", 400, "malformed_json"),
        ] {
            let e = parse_object::<Body>(text.as_bytes()).expect_err(text);
            assert_eq!((e.status.as_u16(), e.code), (status, code), "{text}: {e:?}");
        }
    }

    #[test]
    fn json_content_types() {
        let with = |t: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(t).expect("value"),
            );
            json_content_type(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!json_content_type(&axum::http::HeaderMap::new()));
    }
}
