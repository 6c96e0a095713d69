//! `AuthStore` on Redis: everything under `skiff:auth:`, which a worker's ACL user cannot
//! reach. Hashes only: the secrets themselves are never stored.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Value};
use skiff_core::store::{ApiToken, AuthStore, Scope, Session};

use crate::codec::{Fields, Result, backend, from_millis, millis};
use crate::keys;
use crate::store::{AUTH, RedisStore};

/// Now, to the millisecond (as stored).
fn now() -> DateTime<Utc> {
    from_millis(millis(Utc::now())).unwrap_or_else(Utc::now)
}

fn token_from(f: &Fields) -> Result<ApiToken> {
    f.version("an API token")?;
    Ok(ApiToken {
        id: f.text("id")?,
        name: f.text("name")?,
        // An unknown scope (a newer skiff's) grants the least.
        scope: f.text("scope")?.parse().unwrap_or(Scope::Read),
        legacy: f.opt_text("legacy")?.as_deref() == Some("1"),
        created_at: f.time("created_at")?,
        last_used_at: f.opt_time("last_used_at")?,
        revoked_at: f.opt_time("revoked_at")?,
    })
}

impl RedisStore {
    async fn auth<T: redis::FromRedisValue>(&self, op: &str, args: &[String]) -> Result<T> {
        let mut invocation = AUTH.prepare_invoke();
        invocation.arg(op);
        for arg in args {
            invocation.arg(arg);
        }
        invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)
    }
}

#[async_trait]
impl AuthStore for RedisStore {
    async fn password_hash(&self) -> Result<Option<String>> {
        let fields: std::collections::HashMap<String, Vec<u8>> =
            self.conn().hgetall(keys::ADMIN).await.map_err(backend)?;
        let fields = Fields::from_map(fields);
        if fields.is_empty() {
            return Ok(None);
        }
        fields.version("the admin record")?;
        fields.opt_text("password_hash")
    }

    async fn set_password_hash(&self, hash: &str) -> Result<()> {
        let _: () = self
            .conn()
            .hset_multiple(keys::ADMIN, &[("v", "1"), ("password_hash", hash)])
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn create_token(&self, name: &str, token_hash: &str, scope: Scope) -> Result<ApiToken> {
        let token = ApiToken {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.to_string(),
            scope,
            legacy: false,
            created_at: now(),
            last_used_at: None,
            revoked_at: None,
        };
        let _: i64 = self
            .auth(
                "create_token",
                &[
                    token.id.clone(),
                    name.to_string(),
                    token_hash.to_string(),
                    scope.as_str().to_string(),
                    millis(token.created_at).to_string(),
                ],
            )
            .await?;
        Ok(token)
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        // Newest first: by time, then by id (a sorted set orders equal scores by member).
        let ids: Vec<String> = self
            .conn()
            .zrevrange(keys::TOKENS, 0, -1)
            .await
            .map_err(backend)?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::token(id));
        }
        let maps: Vec<std::collections::HashMap<String, Vec<u8>>> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn()).await.map_err(backend)?
        };
        maps.into_iter()
            .map(Fields::from_map)
            .filter(|f| !f.is_empty())
            .map(|f| token_from(&f))
            .collect()
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        let done: i64 = self
            .auth(
                "revoke_token",
                &[id.to_string(), millis(Utc::now()).to_string()],
            )
            .await?;
        Ok(done == 1)
    }

    async fn find_token(&self, token_hash: &str) -> Result<Option<ApiToken>> {
        let found: Value = self
            .auth(
                "find_token",
                &[token_hash.to_string(), millis(Utc::now()).to_string()],
            )
            .await?;
        let fields = Fields::from_value(found)?;
        if fields.is_empty() {
            return Ok(None);
        }
        token_from(&fields).map(Some)
    }

    async fn create_session(
        &self,
        session_hash: &str,
        csrf: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        let _: i64 = self
            .auth(
                "create_session",
                &[
                    session_hash.to_string(),
                    csrf.to_string(),
                    millis(Utc::now()).to_string(),
                    millis(expires_at).to_string(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn find_session(&self, session_hash: &str) -> Result<Option<Session>> {
        let fields: std::collections::HashMap<String, Vec<u8>> = self
            .conn()
            .hgetall(keys::session(session_hash))
            .await
            .map_err(backend)?;
        let fields = Fields::from_map(fields);
        if fields.is_empty() {
            return Ok(None);
        }
        fields.version("a session")?;
        let expires_at = fields.time("expires_at")?;
        if expires_at <= Utc::now() {
            return Ok(None);
        }
        Ok(Some(Session {
            csrf: fields.text("csrf")?,
            expires_at,
        }))
    }

    async fn delete_session(&self, session_hash: &str) -> Result<()> {
        let _: i64 = self
            .auth("delete_session", &[session_hash.to_string()])
            .await?;
        Ok(())
    }

    async fn delete_sessions_except(&self, keep: &str) -> Result<()> {
        let _: i64 = self
            .auth("delete_sessions_except", &[keep.to_string()])
            .await?;
        Ok(())
    }

    async fn create_login_link(&self, link_hash: &str, expires_at: DateTime<Utc>) -> Result<()> {
        let key = keys::login_link(link_hash);
        let at = millis(expires_at);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                &key,
                &[("v", "1".to_string()), ("expires_at", at.to_string())],
            )
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&key)
            .arg(at)
            .ignore();
        let _: () = pipe.query_async(&mut self.conn()).await.map_err(backend)?;
        Ok(())
    }

    async fn use_login_link(&self, link_hash: &str) -> Result<bool> {
        let used: i64 = self
            .auth(
                "use_login_link",
                &[link_hash.to_string(), millis(Utc::now()).to_string()],
            )
            .await?;
        Ok(used == 1)
    }
}
