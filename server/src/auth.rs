//! Who is asking: an API token (`Authorization: Bearer`), the admin token given in
//! `SKIFF_ADMIN_TOKEN`, or a UI session cookie (with a CSRF token for anything that changes state).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use chrono::{Duration, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use skiff_core::store::Scope;

use crate::AppState;
use crate::error::ApiError;

pub const SESSION_COOKIE: &str = "skiff_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const SESSION_DAYS: i64 = 14;
pub const LOGIN_LINK_MINUTES: i64 = 60;
/// Password attempts one client address may make within [`GUESS_WINDOW`] (each counted before
/// the password is checked; a right one is not held against it).
pub const GUESSES_ALLOWED: usize = 5;
pub const GUESS_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Failed attempts from all addresses together within [`GUESS_WINDOW`] past which every
/// password check waits [`GLOBAL_SLOWDOWN`] first: guessing from many addresses is slowed, but
/// nobody is locked out of their own login.
pub const GLOBAL_FAILURES: usize = 20;
pub const GLOBAL_SLOWDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// Slows password guessing. Each attempt is counted against its client address *before* the
/// password is checked (so parallel guesses cannot all get through between a check and its
/// count); past [`GUESSES_ALLOWED`] that address is refused until its oldest attempt leaves the
/// window. Password checks run one at a time, and while many have failed recently from anywhere,
/// each waits a little first. A refused owner still has the one-time link (`skiff login-link`)
/// and API tokens.
#[derive(Default)]
pub struct LoginThrottle {
    state: std::sync::Mutex<ThrottleState>,
    /// One argon2 check at a time.
    checking: tokio::sync::Mutex<()>,
    /// Attempts counted where every server sees them (Redis, for servers that share it); the
    /// counts in `state` stand in while it cannot be reached.
    shared: Option<std::sync::Arc<dyn AttemptLog>>,
}

/// Password attempts counted outside the process, so that servers sharing a Store share the
/// count: a guesser gains nothing by spreading guesses over them.
#[async_trait::async_trait]
pub trait AttemptLog: Send + Sync + 'static {
    /// Counts an attempt (`id`) against `key` unless `allowed` were made within `window`:
    /// `Ok(Err(wait))` then, with the time until the oldest leaves the window.
    async fn reserve(
        &self,
        key: &str,
        id: &str,
        allowed: usize,
        window: std::time::Duration,
    ) -> Result<Result<(), std::time::Duration>, String>;
    /// Takes an attempt back (a right password).
    async fn forget(&self, key: &str, id: &str) -> Result<(), String>;
    /// Counts a failed attempt, from anywhere.
    async fn failed(&self, id: &str, window: std::time::Duration) -> Result<(), String>;
    /// Failed attempts from anywhere within `window`.
    async fn recent_failures(&self, window: std::time::Duration) -> Result<usize, String>;
}

#[derive(Default)]
struct ThrottleState {
    by_addr:
        std::collections::HashMap<std::net::IpAddr, std::collections::VecDeque<std::time::Instant>>,
    failures: std::collections::VecDeque<std::time::Instant>,
}

/// An attempt counted against its address; [`LoginThrottle::succeeded`] takes it back.
struct Attempt {
    addr: std::net::IpAddr,
    at: std::time::Instant,
}

impl LoginThrottle {
    /// A throttle whose counts are kept in `log`, shared with other servers.
    pub fn shared(log: std::sync::Arc<dyn AttemptLog>) -> Self {
        LoginThrottle {
            shared: Some(log),
            ..Default::default()
        }
    }

    /// Checks `password` against `hash` (no password set: never right), counted against `addr`
    /// before the check; `Err(wait)` when that address has used its attempts. The one way a
    /// password is checked (sign-in, and the current password when changing it).
    pub async fn verify(
        &self,
        addr: std::net::IpAddr,
        password: &str,
        hash: Option<&str>,
    ) -> Result<bool, std::time::Duration> {
        if let Some(log) = &self.shared {
            let key = client_key(addr).to_string();
            let id = uuid::Uuid::now_v7().simple().to_string();
            match log.reserve(&key, &id, GUESSES_ALLOWED, GUESS_WINDOW).await {
                Ok(Ok(())) => {
                    let busy = log
                        .recent_failures(GUESS_WINDOW)
                        .await
                        .is_ok_and(|n| n >= GLOBAL_FAILURES);
                    let ok = self.check_password(password, hash, busy).await;
                    let done = if ok {
                        log.forget(&key, &id).await
                    } else {
                        log.failed(&id, GUESS_WINDOW).await
                    };
                    if let Err(e) = done {
                        tracing::warn!(error = %e, "recording a password attempt failed");
                    }
                    return Ok(ok);
                }
                Ok(Err(wait)) => return Err(wait),
                Err(e) => {
                    tracing::warn!(error = %e, "the shared login throttle cannot be reached; counting here");
                }
            }
        }
        let attempt = self.reserve(addr)?;
        let ok = match hash {
            Some(h) => {
                let (password, h) = (password.to_string(), h.to_string());
                self.check(async move {
                    tokio::task::spawn_blocking(move || verify_password(&password, &h))
                        .await
                        .unwrap_or(false)
                })
                .await
            }
            None => false,
        };
        if ok {
            self.succeeded(attempt);
        } else {
            self.failed(attempt);
        }
        Ok(ok)
    }

    /// Counts an attempt from `addr`, or `Err(wait)` when that address has used its attempts.
    fn reserve(&self, addr: std::net::IpAddr) -> Result<Attempt, std::time::Duration> {
        let addr = client_key(addr);
        let now = std::time::Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Forget what has left the window (all addresses, so the map stays small).
        st.by_addr.retain(|_, q| {
            while q
                .front()
                .is_some_and(|t| now.duration_since(*t) >= GUESS_WINDOW)
            {
                q.pop_front();
            }
            !q.is_empty()
        });
        let q = st.by_addr.entry(addr).or_default();
        if q.len() >= GUESSES_ALLOWED {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(GUESS_WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        q.push_back(now);
        Ok(Attempt { addr, at: now })
    }

    /// Checks a password (one check at a time; after a pause when `busy`).
    async fn check_password(&self, password: &str, hash: Option<&str>, busy: bool) -> bool {
        let Some(h) = hash else { return false };
        let _one = self.checking.lock().await;
        if busy {
            tokio::time::sleep(GLOBAL_SLOWDOWN).await;
        }
        let (password, h) = (password.to_string(), h.to_string());
        tokio::task::spawn_blocking(move || verify_password(&password, &h))
            .await
            .unwrap_or(false)
    }

    /// Runs a password check: one at a time, after a pause while many failed recently.
    async fn check<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _one = self.checking.lock().await;
        let busy = {
            let now = std::time::Instant::now();
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            while st
                .failures
                .front()
                .is_some_and(|t| now.duration_since(*t) >= GUESS_WINDOW)
            {
                st.failures.pop_front();
            }
            st.failures.len() >= GLOBAL_FAILURES
        };
        if busy {
            tokio::time::sleep(GLOBAL_SLOWDOWN).await;
        }
        f.await
    }

    fn failed(&self, _attempt: Attempt) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.failures.push_back(std::time::Instant::now());
        if st.failures.len() > GLOBAL_FAILURES {
            st.failures.pop_front();
        }
    }

    /// A right password: its attempt is not held against its address.
    fn succeeded(&self, attempt: Attempt) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = st.by_addr.get_mut(&attempt.addr)
            && let Some(i) = q.iter().position(|t| *t == attempt.at)
        {
            q.remove(i);
        }
    }
}

/// What attempts are counted against: the address, or for IPv6 its /64 (one client usually
/// holds a whole /64, and could otherwise take a fresh address for every guess).
fn client_key(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut o = v6.octets();
            o[8..].fill(0);
            std::net::IpAddr::V6(o.into())
        }
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address (from the connection), when the server knows it.
pub struct ClientAddr(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip()),
        ))
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The admin, signed in through the UI; `csrf` must accompany state-changing requests.
    /// `hash` names the session (to end the others when the password changes).
    Session { csrf: String, hash: String },
    /// A named API token and what it may do.
    Token { name: String, scope: Scope },
    /// The token from `SKIFF_ADMIN_TOKEN`.
    AdminToken,
}

impl Principal {
    /// What it may do: a session and the admin token, everything.
    pub fn scope(&self) -> Scope {
        match self {
            Principal::Token { scope, .. } => *scope,
            Principal::Session { .. } | Principal::AdminToken => Scope::Admin,
        }
    }

    /// `Err` (403) unless it may do what `needed` allows.
    pub fn allow(&self, needed: Scope) -> Result<(), ApiError> {
        if self.scope() >= needed {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!(
                "this token's scope is `{}`; this needs `{}`",
                self.scope().as_str(),
                needed.as_str()
            ),
        ))
    }

    /// How runs record who triggered them.
    pub fn actor(&self) -> String {
        match self {
            Principal::Session { .. } => "admin".into(),
            Principal::Token { name, .. } => format!("token:{name}"),
            Principal::AdminToken => "admin-token".into(),
        }
    }
}

/// A new random secret: 32 bytes, URL-safe text.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness means no safe credential: stop rather than issue a guessable one.
        panic!("the operating system's random source failed");
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::from(prefix);
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// How tokens, session ids and login links are stored: SHA-256, hex. They are long random
/// secrets, so a fast hash is enough; passwords use argon2.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    use argon2::password_hash::PasswordHasher;
    use argon2::password_hash::phc::PasswordHash;
    let hash: PasswordHash = argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| ApiError::internal("hashing a password", e))?;
    Ok(hash.to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    use argon2::password_hash::phc::PasswordHash;
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of the cookie `name` in a request's headers.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Finds the principal of a request, if any.
pub async fn identify(parts: &Parts, state: &AppState) -> Result<Option<Principal>, ApiError> {
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if token.is_empty() {
            return Ok(None);
        }
        if let Some(admin) = &state.config.admin_token_hash
            && constant_time_eq(&hash_secret(token), admin)
        {
            return Ok(Some(Principal::AdminToken));
        }
        let found = state.auth.find_token(&hash_secret(token)).await?;
        return Ok(found.map(|t| Principal::Token {
            name: t.name,
            scope: t.scope,
        }));
    }
    if let Some(session) = cookie(&parts.headers, SESSION_COOKIE) {
        let hash = hash_secret(&session);
        if let Some(s) = state.auth.find_session(&hash).await? {
            return Ok(Some(Principal::Session { csrf: s.csrf, hash }));
        }
    }
    Ok(None)
}

/// Whether a request with this method may change state (and so needs a session's CSRF token,
/// a `run` scope, and has a body): anything but GET, HEAD and OPTIONS.
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The scope a request needs: managing tokens `admin`, reading `read`, anything else that
/// changes state (start, cancel, rerun) `run`. The one rule; the OpenAPI document lists it per
/// operation from here.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    if path == "/api/tokens" || path.starts_with("/api/tokens/") {
        Scope::Admin
    } else if !changes_state(method) {
        Scope::Read
    } else {
        Scope::Run
    }
}

/// Requires a principal for an API route (401 otherwise) whose scope allows it (403). A session
/// (cookie) request that changes state must carry the session's CSRF token in `X-CSRF-Token`.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = identify(parts, state)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        principal.allow(required_scope(&parts.method, parts.uri.path()))?;
        if let Principal::Session { csrf, .. } = &principal {
            let safe = !changes_state(&parts.method);
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !safe && !constant_time_eq(sent, csrf) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "missing or wrong X-CSRF-Token",
                ));
            }
        }
        Ok(Auth(principal))
    }
}

/// Issues a session (with its CSRF token, kept in the Store); returns the `Set-Cookie` value.
pub async fn start_session(state: &AppState) -> Result<String, ApiError> {
    let session = random_token("");
    let csrf = random_token("");
    let expires = Utc::now() + Duration::days(SESSION_DAYS);
    state
        .auth
        .create_session(&hash_secret(&session), &csrf, expires)
        .await?;
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_DAYS * 24 * 3600
    );
    Ok(cookie)
}

pub fn clear_session_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Creates a one-time login link token (valid for an hour) and returns it.
pub async fn issue_login_link(
    auth: &dyn skiff_core::store::AuthStore,
) -> Result<String, skiff_core::store::StoreError> {
    let token = random_token("");
    auth.create_login_link(
        &hash_secret(&token),
        Utc::now() + Duration::minutes(LOGIN_LINK_MINUTES),
    )
    .await?;
    Ok(token)
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let t = LoginThrottle::default();
        for i in 0..GUESSES_ALLOWED {
            let a: std::net::IpAddr = format!("2001:db8:1:2::{i:x}").parse().expect("ip");
            assert!(t.reserve(a).is_ok(), "{i}");
        }
        let same_64: std::net::IpAddr = "2001:db8:1:2:ffff::1".parse().expect("ip");
        assert!(t.reserve(same_64).is_err(), "the same /64 is one client");
        let other_64: std::net::IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(t.reserve(other_64).is_ok());
        let mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        let v4: std::net::IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(client_key(mapped), v4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_hashes() {
        let a = random_token("skiff_");
        assert!(a.starts_with("skiff_") && a.len() == 6 + 43, "{a}");
        assert_ne!(a, random_token("skiff_"));
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = hash_password("correct horse").expect("hash");
        assert!(verify_password("correct horse", &h) && !verify_password("wrong", &h));
        assert!(
            constant_time_eq("abc", "abc")
                && !constant_time_eq("abc", "abd")
                && !constant_time_eq("abc", "ab")
        );
    }
}
