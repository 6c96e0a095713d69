//! Credentials: the admin password, API tokens, UI sessions and one-time login links. The Store
//! keeps only hashes; hashing and checking happen at the edge that receives the secret.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
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

    async fn create_token(&self, name: &str, token_hash: &str) -> Result<ApiToken>;
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

    async fn create_login_link(&self, link_hash: &str, expires_at: DateTime<Utc>) -> Result<()>;
    /// Uses a one-time login link: true (once) when it exists, is unused and unexpired.
    async fn use_login_link(&self, link_hash: &str) -> Result<bool>;
}
