//! `POST /hooks/{id}`: webhook deliveries. The signature is checked before anything else is
//! read; an unknown hook and a bad signature get the same 401, so the URL cannot probe
//! pipeline names. A verified delivery goes to every pipeline naming the hook: each applies its
//! filters, makes its params from the event and starts a run once per (hook, delivery id,
//! pipeline), the run's idempotency key. Every arrival is logged (the deliveries log), with
//! what came of it and why.
//!
//! The body is read here with a limit of its own ([`ServerConfig::hooks_max_body`], 1 MiB by
//! default), not the API's.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use skiff_core::catalog::Entry;
use skiff_core::run::{Trigger, TriggerKind};
use skiff_core::store::{
    DELIVERY_BODY_KEPT, Delivery, DeliveryOutcome, DeliveryResult, Redelivery,
};
use skiff_core::webhook::{self, Event, EventScope, Provider};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};

/// The default limit on a delivery's body.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;
/// How long the deliveries log keeps a delivery.
pub const KEEP_DELIVERIES: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// What a delivery did.
#[derive(Serialize, ToSchema)]
pub struct DeliveryAnswer {
    /// The entry in the deliveries log.
    pub delivery: String,
    /// `started`, `skipped` or `failed`.
    pub outcome: String,
    /// One per pipeline that names the hook.
    pub results: Vec<ResultDto>,
}

#[derive(Serialize, ToSchema, Clone)]
pub struct ResultDto {
    pub pipeline: String,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl From<&DeliveryResult> for ResultDto {
    fn from(r: &DeliveryResult) -> Self {
        ResultDto {
            pipeline: r.pipeline.clone(),
            outcome: r.outcome.as_str().into(),
            reason: r.reason.clone(),
            run: r.run.clone(),
        }
    }
}

/// Receive a webhook delivery (GitHub, Gitea, Forgejo, GitLab, or any sender signing with
/// `X-Skiff-Signature-256`).
#[utoipa::path(post, path = "/hooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "the hook's id (`on.webhook.hook`, or the pipeline's name)")),
    request_body(content = String, description = "the provider's payload: JSON, or form-encoded with a `payload` field"),
    responses(
        (status = 200, description = "verified: a ping, a delivery that matched no pipeline, or one seen before (naming its runs)", body = DeliveryAnswer),
        (status = 202, description = "verified: runs were queued", body = DeliveryAnswer),
        (status = 400, description = "verified, but the payload cannot be read", body = ErrorBody),
        (status = 401, description = "an unknown hook, or a missing or wrong signature: nothing was started", body = ErrorBody),
        (status = 413, description = "the body is over the hooks' limit (1 MiB by default)", body = ErrorBody)),
    security(()))]
pub async fn receive(
    State(state): State<AppState>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = state.config.hooks_max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a delivery's body is limited to {limit} bytes"),
        )
    };
    let length = content_length(&headers);
    // Far over the limit: answered at once (the client may see its connection closed before
    // it has sent everything). A little over: read and thrown away first, so the client, done
    // sending, reads the answer.
    if length.is_some_and(|n| n > limit.saturating_add(DRAINED)) {
        return Err(too_large());
    }
    // The body's HMAC under the hook's secret is computed as the body arrives (a megabyte's
    // HMAC overlaps its reading); the signature is only compared once it is all there.
    let target = Hook::find(&state, &hook);
    let mac = target
        .secret
        .as_ref()
        .and_then(|s| Hmac::<Sha256>::new_from_slice(s.as_bytes()).ok());
    let (body, body_mac) = tokio::time::timeout(
        crate::listen::BODY_TIMEOUT,
        read_body(body, length, limit, mac),
    )
    .await
    .map_err(|_| crate::listen::body_timeout())?
    .map_err(|e| match e {
        BodyError::TooLarge => too_large(),
        BodyError::Read(e) => ApiError::bad_request(format!("reading the body: {e}")),
    })?;
    let mut got = Received::new(hook, &headers, body);
    got.body_mac = body_mac;
    let delivery = handle(&state, &target, got, None).await;
    answer(&delivery)
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

/// How much of a body over the limit is read and thrown away before the 413 is answered.
const DRAINED: usize = 4 << 20;

/// From this size on (by its Content-Length), a body's HMAC is computed on another thread as
/// its parts arrive: a megabyte's hash (0.7 ms here) then runs beside its reading instead of
/// after each part, and ends a part after it. Smaller bodies hash inline (a thread hand-off
/// costs more than their hash).
const HASH_APART_FROM: usize = 128 << 10;

/// The body, up to `limit` bytes, read into one buffer sized from its Content-Length (a
/// megabyte copied once, not grown and copied again), and its HMAC under `mac`'s key.
async fn read_body(
    body: Body,
    length: Option<usize>,
    limit: usize,
    mac: Option<Hmac<Sha256>>,
) -> Result<(Vec<u8>, Option<Vec<u8>>), BodyError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = Vec::with_capacity(length.unwrap_or(0).min(limit));
    let finish = |m: Hmac<Sha256>| m.finalize().into_bytes().to_vec();
    let (mut inline, apart) = match mac {
        Some(m) if length.is_some_and(|n| n >= HASH_APART_FROM) => {
            let (parts, arrive) = std::sync::mpsc::channel::<axum::body::Bytes>();
            let hasher = tokio::task::spawn_blocking(move || {
                let mut m = m;
                for part in arrive {
                    m.update(&part);
                }
                finish(m)
            });
            (None, Some((parts, hasher)))
        }
        m => (m, None),
    };
    let mut over = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            if over > 0 || buf.len() + data.len() > limit {
                // Too large: the rest is read (up to `DRAINED`) and thrown away.
                over += data.len();
                if over > DRAINED {
                    break;
                }
                continue;
            }
            buf.extend_from_slice(&data);
            if let Some(m) = inline.as_mut() {
                m.update(&data);
            } else if let Some((parts, _)) = &apart {
                // The hasher only stops when `parts` is dropped.
                let _ = parts.send(data);
            }
        }
    }
    if over > 0 {
        return Err(BodyError::TooLarge);
    }
    let tag = match (inline, apart) {
        (Some(m), _) => Some(finish(m)),
        (None, Some((parts, hasher))) => {
            drop(parts);
            hasher.await.ok()
        }
        (None, None) => None,
    };
    Ok((buf, tag))
}

/// The pipelines naming a hook, and the secret that checks its deliveries.
struct Hook {
    entries: Vec<Arc<Entry>>,
    /// The secret's name (the first pipeline's by name: they all name the same one).
    secret_name: Option<String>,
    /// Its value, when skiff's secrets hold it.
    secret: Option<String>,
}

impl Hook {
    fn find(state: &AppState, hook: &str) -> Hook {
        let catalog = state.catalog.current();
        let entries: Vec<Arc<Entry>> = catalog
            .entries()
            .filter(|e| {
                e.pipeline
                    .as_ref()
                    .and_then(|p| p.on.webhook.as_ref())
                    .is_some_and(|w| w.hook == hook)
            })
            .cloned()
            .collect();
        let secret_name = entries
            .first()
            .and_then(|e| e.pipeline.as_ref()?.on.webhook.as_ref())
            .map(|w| w.secret_name.clone());
        let secret = secret_name
            .as_deref()
            .and_then(|n| state.secrets.get(n))
            .map(str::to_string);
        Hook {
            entries,
            secret_name,
            secret,
        }
    }
}

/// A delivery as it arrived.
pub struct Received {
    pub hook: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// HMAC-SHA256 of `body` under the hook's secret, computed as it arrived.
    pub body_mac: Option<Vec<u8>>,
}

impl Received {
    pub fn new(hook: String, headers: &HeaderMap, body: Vec<u8>) -> Self {
        let headers = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Received {
            hook,
            headers,
            body,
            body_mac: None,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON a form-encoded delivery carries in its `payload` field (empty when it has
    /// none); `None` for a body that is not form-encoded.
    fn form_payload(&self) -> Option<Vec<u8>> {
        self.header("content-type")
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
            .then(|| {
                form_urlencoded::parse(&self.body)
                    .find(|(k, _)| k == "payload")
                    .map(|(_, v)| v.into_owned().into_bytes())
                    .unwrap_or_default()
            })
    }
}

/// The answer to a delivery, from what the log recorded.
fn answer(d: &Delivery) -> Result<Response, ApiError> {
    match d.outcome {
        DeliveryOutcome::Refused if !d.verified => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the delivery's signature does not check out (or the hook is unknown)",
        )),
        DeliveryOutcome::Refused => Err(ApiError::bad_request(
            d.reason
                .clone()
                .unwrap_or_else(|| "unreadable payload".into()),
        )),
        outcome => {
            let body = DeliveryAnswer {
                delivery: d.key.clone(),
                outcome: outcome.as_str().into(),
                results: d.results.iter().map(ResultDto::from).collect(),
            };
            let queued = d.results.iter().any(|r| {
                r.outcome == DeliveryOutcome::Started
                    && !r.reason.as_deref().is_some_and(|w| w.starts_with(SEEN))
            });
            let status = if queued {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(body)).into_response())
        }
    }
}

/// The reason a repeat of a delivery gives: its run was made before.
const SEEN: &str = "delivered before";

/// Checks, evaluates and logs one delivery; `redelivery` when skiff's own Redeliver sends it
/// again (already verified when it first came, and keyed apart so that it makes new runs).
async fn handle(
    state: &AppState,
    target: &Hook,
    got: Received,
    redelivery: Option<Redelivery>,
) -> Delivery {
    let received_at = chrono::Utc::now();
    let (provider, raw_event) = Provider::detect(|h| got.header(h));
    let delivery_id = [
        "x-github-delivery",
        "x-gitea-delivery",
        "x-forgejo-delivery",
        "x-gitlab-event-uuid",
        "x-skiff-delivery",
    ]
    .iter()
    .find_map(|h| got.header(h))
    .filter(|id| !id.is_empty() && id.len() <= 200)
    .map(str::to_string);
    let Hook {
        entries,
        secret_name,
        secret,
    } = target;
    let mut d = Delivery {
        key: uuid::Uuid::now_v7().to_string(),
        hook: got.hook.clone(),
        id: delivery_id
            .clone()
            .unwrap_or_else(|| format!("skiff-{}", uuid::Uuid::now_v7())),
        provider: provider.as_str().into(),
        event: raw_event.clone(),
        received_at,
        verified: false,
        outcome: DeliveryOutcome::Refused,
        reason: None,
        results: Vec::new(),
        headers: Vec::new(),
        body: Vec::new(),
        body_len: got.body.len() as u64,
        redelivery,
    };
    let checked = if d.redelivery.is_some() {
        Ok(())
    } else if entries.is_empty() {
        Err("no pipeline names this hook".to_string())
    } else {
        match &secret {
            None => Err(format!(
                "the secret `{}` is not provided (SKIFF_SECRET_{0} or the secrets file)",
                secret_name.as_deref().unwrap_or("?")
            )),
            Some(s) => verify(provider, &got, s.as_bytes()),
        }
    };
    match checked {
        Err(why) => {
            d.reason = Some(why);
        }
        Ok(()) => {
            d.verified = true;
            evaluate(state, &got, entries, provider, &raw_event, &mut d).await;
        }
    }
    // A verified delivery that started nothing is kept whole, so it can be sent again.
    let whole = d.verified && !matches!(d.outcome, DeliveryOutcome::Started);
    let kept = if whole {
        got.body.len()
    } else {
        got.body.len().min(DELIVERY_BODY_KEPT)
    };
    let Received {
        headers, mut body, ..
    } = got;
    body.truncate(kept);
    d.body = body;
    d.headers = headers;
    mask(&mut d, secret.as_deref());
    if let Err(e) = state.store.record_delivery(&d).await {
        tracing::warn!(error = %e, hook = %d.hook, "logging a webhook delivery failed");
    }
    metrics::counter!("skiff_webhook_deliveries_total", "outcome" => d.outcome.as_str())
        .increment(1);
    d
}

/// Runs the verified delivery past each pipeline naming the hook.
async fn evaluate(
    state: &AppState,
    got: &Received,
    entries: &[Arc<Entry>],
    provider: Provider,
    raw_event: &str,
    d: &mut Delivery,
) {
    // A ping answers 200 whatever it holds: it never starts a run.
    if raw_event == "ping" && provider != Provider::GitLab {
        d.event = "ping".into();
        d.outcome = DeliveryOutcome::Skipped;
        d.reason = Some("a ping: the hook is set up".into());
        return;
    }
    let form_json = got.form_payload();
    let json = form_json.as_deref().unwrap_or(&got.body);
    let ev = match webhook::parse(provider, raw_event, &d.id, json) {
        Ok(ev) => ev,
        Err(e) => {
            d.reason = Some(e.to_string());
            return;
        }
    };
    d.event = ev.event.clone();
    for entry in entries {
        let result = start(state, entry, &ev, json, d).await;
        d.results.push(result);
    }
    let any = |o: DeliveryOutcome| d.results.iter().any(|r| r.outcome == o);
    d.outcome = if any(DeliveryOutcome::Started) {
        DeliveryOutcome::Started
    } else if any(DeliveryOutcome::Failed) {
        DeliveryOutcome::Failed
    } else {
        DeliveryOutcome::Skipped
    };
    if d.outcome != DeliveryOutcome::Started {
        d.reason = d
            .results
            .iter()
            .find_map(|r| r.reason.clone().map(|w| format!("{}: {w}", r.pipeline)));
    }
}

/// One pipeline's part: its filters, its params, its run (once per delivery id).
async fn start(
    state: &AppState,
    entry: &Entry,
    ev: &Event,
    json: &[u8],
    d: &Delivery,
) -> DeliveryResult {
    let mut result = DeliveryResult {
        pipeline: entry.name.clone(),
        outcome: DeliveryOutcome::Skipped,
        reason: None,
        run: None,
    };
    let Some(hook) = entry.pipeline.as_ref().and_then(|p| p.on.webhook.as_ref()) else {
        return result;
    };
    let given = {
        let scope = EventScope::new(ev, json);
        if let Err(why) = webhook::filter(hook, ev, &scope) {
            result.reason = Some(why);
            return result;
        }
        match webhook::params(hook, &scope) {
            Ok(p) => p,
            Err(why) => {
                result.outcome = DeliveryOutcome::Failed;
                result.reason = Some(why);
                return result;
            }
        }
    };
    let mut key = format!("webhook:{}:{}", d.hook, d.id);
    if let Some(r) = &d.redelivery {
        key.push_str(&format!(":redeliver:{}", r.count));
    }
    let actor = match &d.redelivery {
        Some(r) => format!("{} (redelivered by {})", describe(ev), r.by),
        None => describe(ev),
    };
    let trigger = Trigger {
        kind: TriggerKind::Webhook,
        actor,
    };
    match state
        .dispatcher
        .trigger_once(entry, &given, trigger, key)
        .await
    {
        Ok(created) => {
            result.outcome = DeliveryOutcome::Started;
            result.run = Some(created.run.id.to_string());
            if !created.created {
                result.reason = Some(format!("{SEEN}: run #{}", created.run.number));
            }
        }
        Err(e) => {
            result.outcome = DeliveryOutcome::Failed;
            result.reason = Some(match e {
                skiff_core::dispatch::DispatchError::Params(fields) => fields
                    .iter()
                    .map(|f| format!("param `{}`: {}", f.param, f.message))
                    .collect::<Vec<_>>()
                    .join("; "),
                e => e.to_string(),
            });
        }
    }
    result
}

/// How a webhook run names what started it: `github push refs/heads/main @ 9049f12 by octocat`.
fn describe(ev: &Event) -> String {
    let mut s = format!("{} {}", ev.provider, ev.event);
    if let Some(r) = &ev.git_ref {
        s.push_str(&format!(" {r}"));
    }
    if let Some(sha) = &ev.sha {
        s.push_str(&format!(" @ {}", sha.get(..12).unwrap_or(sha)));
    }
    if let Some(who) = &ev.sender {
        s.push_str(&format!(" by {who}"));
    }
    s.chars().take(300).collect()
}

/// Checks a delivery's signature (or GitLab's token) with the hook's secret.
fn verify(provider: Provider, got: &Received, secret: &[u8]) -> Result<(), String> {
    match provider {
        Provider::GitLab => {
            let token = got
                .header("x-gitlab-token")
                .ok_or("no X-Gitlab-Token header")?;
            if bool::from(token.as_bytes().ct_eq(secret)) {
                Ok(())
            } else {
                Err("X-Gitlab-Token does not match the hook's secret".into())
            }
        }
        Provider::Gitea if got.header("x-gitea-signature").is_some() => {
            let sig = got.header("x-gitea-signature").unwrap_or_default();
            // Gitea signs the JSON payload, even when the body is form-encoded.
            match got.form_payload() {
                Some(payload) => check_hmac(secret, &payload, sig, "X-Gitea-Signature"),
                None => check_body_hmac(got, secret, sig, "X-Gitea-Signature"),
            }
        }
        Provider::GitHub | Provider::Gitea => {
            let sig = got
                .header("x-hub-signature-256")
                .ok_or("no X-Hub-Signature-256 header")?;
            let hex = sig
                .strip_prefix("sha256=")
                .ok_or("X-Hub-Signature-256 does not start with sha256=")?;
            check_body_hmac(got, secret, hex, "X-Hub-Signature-256")
        }
        Provider::Generic => {
            let sig = got
                .header("x-skiff-signature-256")
                .or_else(|| got.header("x-hub-signature-256"))
                .ok_or("no X-Skiff-Signature-256 header")?;
            let hex = sig.strip_prefix("sha256=").unwrap_or(sig);
            check_body_hmac(got, secret, hex, "X-Skiff-Signature-256")
        }
    }
}

/// [`check_hmac`] of the raw body, with the HMAC computed as it arrived when there is one.
fn check_body_hmac(got: &Received, secret: &[u8], hex: &str, header: &str) -> Result<(), String> {
    match &got.body_mac {
        Some(tag) => check_tag(tag, hex, header),
        None => check_hmac(secret, &got.body, hex, header),
    }
}

/// HMAC-SHA256 of `body` under `secret` against a hex signature, in constant time.
fn check_hmac(secret: &[u8], body: &[u8], hex: &str, header: &str) -> Result<(), String> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "the secret cannot key an HMAC")?;
    mac.update(body);
    check_tag(&mac.finalize().into_bytes(), hex, header)
}

/// An HMAC against the hex signature a header gave, in constant time.
fn check_tag(tag: &[u8], hex: &str, header: &str) -> Result<(), String> {
    let given = decode_hex(hex.trim()).ok_or_else(|| format!("{header} is not hex"))?;
    if bool::from(given.as_slice().ct_eq(tag)) {
        Ok(())
    } else {
        Err(format!(
            "{header} does not match the body and the hook's secret"
        ))
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The headers that carry a secret are masked; so is the secret wherever the body holds it.
fn mask(d: &mut Delivery, secret: Option<&str>) {
    for (k, v) in &mut d.headers {
        if matches!(
            k.to_ascii_lowercase().as_str(),
            "x-gitlab-token" | "authorization" | "cookie" | "proxy-authorization"
        ) {
            *v = "***".into();
        }
    }
    if let Some(s) = secret.filter(|s| s.len() >= 4)
        && let Some(body) = std::str::from_utf8(&d.body).ok().filter(|b| b.contains(s))
    {
        d.body = body.replace(s, "***").into_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_documented_signature_checks_out() {
        let secret = b"It's a Secret to Everybody";
        let sig = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(check_hmac(secret, b"Hello, World!", sig, "h"), Ok(()));
        assert!(check_hmac(secret, b"Hello, World?", sig, "h").is_err());
        assert!(check_hmac(b"another", b"Hello, World!", sig, "h").is_err());
        assert!(check_hmac(secret, b"Hello, World!", &sig[..10], "h").is_err());
        assert!(check_hmac(secret, b"Hello, World!", "zz", "h").is_err());
    }
}

/// One entry of the deliveries log.
#[derive(Serialize, ToSchema)]
pub struct DeliveryDto {
    /// The entry's id (`/api/deliveries/{key}`).
    pub key: String,
    pub hook: String,
    /// The provider's delivery id.
    pub id: String,
    pub provider: String,
    pub event: String,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub verified: bool,
    /// `started`, `skipped`, `failed` or `refused`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub results: Vec<ResultDto>,
    /// The body's size as received.
    pub body_len: u64,
    /// Whether the log holds the whole body (it can be sent again).
    pub body_whole: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redelivery: Option<RedeliveryDto>,
    /// The request's headers (secrets masked); in a single delivery only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<(String, String)>>,
    /// The body as kept (UTF-8, invalid bytes replaced); in a single delivery only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RedeliveryDto {
    /// The entry sent again.
    pub of: String,
    pub by: String,
    pub count: u32,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryDto>,
}

pub fn delivery_dto(d: &Delivery, whole: bool) -> DeliveryDto {
    DeliveryDto {
        key: d.key.clone(),
        hook: d.hook.clone(),
        id: d.id.clone(),
        provider: d.provider.clone(),
        event: d.event.clone(),
        received_at: d.received_at,
        verified: d.verified,
        outcome: d.outcome.as_str().into(),
        reason: d.reason.clone(),
        results: d.results.iter().map(ResultDto::from).collect(),
        body_len: d.body_len,
        body_whole: d.body_whole(),
        redelivery: d.redelivery.as_ref().map(|r| RedeliveryDto {
            of: r.of.clone(),
            by: r.by.clone(),
            count: r.count,
        }),
        headers: whole.then(|| d.headers.clone()),
        body: whole.then(|| String::from_utf8_lossy(&d.body).into_owned()),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Only this hook's deliveries.
    hook: Option<String>,
    /// At most this many: 1 to 500 (50 when absent).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// The deliveries log, newest first (kept 7 days).
#[utoipa::path(get, path = "/api/deliveries", tag = "webhooks", params(DeliveriesQuery),
    responses((status = 200, description = "the deliveries", body = DeliveryList),
        (status = 400, description = "a bad query", body = ErrorBody)))]
pub async fn list_deliveries(
    _auth: crate::auth::Auth,
    State(state): State<AppState>,
    query: Result<axum::extract::Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = crate::api::check_limit(q.limit, 50, 500)?;
    let deliveries = state
        .store
        .deliveries(&skiff_core::store::DeliveryQuery {
            hook: q.hook,
            id: None,
            limit: u32::try_from(limit).unwrap_or(50),
        })
        .await?;
    Ok(Json(DeliveryList {
        deliveries: deliveries.iter().map(|d| delivery_dto(d, false)).collect(),
    }))
}

/// One delivery with its headers and body.
#[utoipa::path(get, path = "/api/deliveries/{key}", tag = "webhooks",
    params(("key" = String, Path, description = "the delivery's key in the log")),
    responses((status = 200, description = "the delivery", body = DeliveryDto),
        (status = 404, description = "no such delivery (or older than 7 days)", body = ErrorBody)))]
pub async fn get_delivery(
    _auth: crate::auth::Auth,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<DeliveryDto>, ApiError> {
    let d = find(&state, &key).await?;
    Ok(Json(delivery_dto(&d, true)))
}

/// A delivery of the log, or a 404.
pub async fn find(state: &AppState, key: &str) -> Result<Delivery, ApiError> {
    state.store.delivery(key).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no delivery `{}` (deliveries are kept 7 days)",
            key.chars().take(60).collect::<String>()
        ))
    })
}

/// Sends a logged delivery again, as skiff's own Redeliver: it was verified when it came, and
/// it makes new runs (its key counts redeliveries), recorded with who asked.
pub async fn redeliver(
    state: &AppState,
    principal: &crate::auth::Principal,
    key: &str,
) -> Result<Delivery, ApiError> {
    let d = find(state, key).await?;
    if let Some(why) = why_not_redeliverable(&d) {
        return Err(ApiError::conflict(why));
    }
    let earlier = state
        .store
        .deliveries(&skiff_core::store::DeliveryQuery {
            hook: Some(d.hook.clone()),
            id: Some(d.id.clone()),
            limit: 500,
        })
        .await?;
    let count = earlier.iter().filter(|e| e.redelivery.is_some()).count() as u32 + 1;
    let got = Received {
        body_mac: None,
        hook: d.hook.clone(),
        headers: d.headers.clone(),
        body: d.body.clone(),
    };
    let redelivery = Redelivery {
        of: d.key.clone(),
        by: principal.actor(),
        count,
    };
    Ok(handle(state, &Hook::find(state, &d.hook), got, Some(redelivery)).await)
}

/// Why a logged delivery cannot be sent again, if it cannot (the API's 409, the page's note).
pub fn why_not_redeliverable(d: &Delivery) -> Option<String> {
    if !d.verified {
        Some(
            "the delivery was refused (its signature did not check out): it cannot be sent again"
                .into(),
        )
    } else if !d.body_whole() {
        Some(format!(
            "the log keeps only the first {DELIVERY_BODY_KEPT} bytes of this delivery's body; rerun its runs instead"
        ))
    } else {
        None
    }
}

/// Send a delivery again (skiff's Redeliver): the new entry in the log, with the runs it made.
#[utoipa::path(post, path = "/api/deliveries/{key}/redeliver", tag = "webhooks",
    params(("key" = String, Path, description = "the delivery's key in the log")),
    responses((status = 200, description = "sent again: what came of it", body = DeliveryAnswer),
        (status = 202, description = "sent again: runs were queued", body = DeliveryAnswer),
        (status = 404, description = "no such delivery", body = ErrorBody),
        (status = 409, description = "it was refused, or its body was not kept whole", body = ErrorBody)))]
pub async fn redeliver_delivery(
    crate::auth::Auth(principal): crate::auth::Auth,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let d = redeliver(&state, &principal, &key).await?;
    answer(&d)
}
