//! Credentials: the admin password, API tokens, UI sessions and one-time login links. The Store
//! keeps only hashes; hashing and checking happen at the edge that receives the secret.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::Result;

/// What an API token may do. Each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read pipelines, runs and logs.
    Read,
    /// Also start, cancel and rerun runs.
    Run,
    /// Also manage API tokens. (The password and settings need a UI session, never a token.)
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Run, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Run => "run",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}`; one of: read, run, admin"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    /// Made before tokens had scopes: it kept every power (`admin`) so nothing broke.
    pub legacy: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

#[async_trait]
pub trait AuthStore: Send + Sync + 'static {
    /// The admin password's hash (a PHC string), when one has been set.
    async fn password_hash(&self) -> Result<Option<String>>;
    async fn set_password_hash(&self, hash: &str) -> Result<()>;

    async fn create_token(&self, name: &str, token_hash: &str, scope: Scope) -> Result<ApiToken>;
    /// Every token, newest first, revoked ones included.
    async fn list_tokens(&self) -> Result<Vec<ApiToken>>;
    /// Revokes a token; false when there is no such active token.
    async fn revoke_token(&self, id: &str) -> Result<bool>;
    /// The active token with this hash, noting its use.
    async fn find_token(&self, token_hash: &str) -> Result<Option<ApiToken>>;

    async fn create_session(
        &self,
        session_hash: &str,
        csrf: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<()>;
    /// The unexpired session with this hash.
    async fn find_session(&self, session_hash: &str) -> Result<Option<Session>>;
    async fn delete_session(&self, session_hash: &str) -> Result<()>;
    /// Ends every session but `keep` (a password change signs everyone else out).
    async fn delete_sessions_except(&self, keep: &str) -> Result<()>;

    async fn create_login_link(&self, link_hash: &str, expires_at: DateTime<Utc>) -> Result<()>;
    /// Uses a one-time login link: true (once) when it exists, is unused and unexpired.
    async fn use_login_link(&self, link_hash: &str) -> Result<bool>;
}
