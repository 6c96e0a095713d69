//! `AuthStore` on the embedded SQLite Store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::Result;
use super::auth::{ApiToken, AuthStore, Scope, Session};
use super::sqlite::{SqliteStore, backend, from_millis, millis};

fn token_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: r.try_get("id").map_err(backend)?,
        name: r.try_get("name").map_err(backend)?,
        // An unknown scope (a newer skiff's) grants the least.
        scope: r
            .try_get::<String, _>("scope")
            .map_err(backend)?
            .parse()
            .unwrap_or(Scope::Read),
        legacy: r.try_get::<i64, _>("legacy").map_err(backend)? != 0,
        created_at: from_millis(r.try_get("created_at").map_err(backend)?).unwrap_or_default(),
        last_used_at: from_millis(r.try_get("last_used_at").map_err(backend)?),
        revoked_at: from_millis(r.try_get("revoked_at").map_err(backend)?),
    })
}

#[async_trait]
impl AuthStore for SqliteStore {
    async fn password_hash(&self) -> Result<Option<String>> {
        let row = sqlx::query("SELECT password_hash FROM admin WHERE id = 1")
            .fetch_optional(&self.readers)
            .await
            .map_err(backend)?;
        Ok(row.and_then(|r| r.get::<Option<String>, _>(0)))
    }

    async fn set_password_hash(&self, hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO admin (id, password_hash) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET password_hash = ?1")
            .bind(hash)
            .execute(&mut *self.writer.lock().await)
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
            created_at: from_millis(Some(millis(Utc::now()))).unwrap_or_default(),
            last_used_at: None,
            revoked_at: None,
        };
        sqlx::query("INSERT INTO api_tokens (id, name, hash, created_at, scope, legacy) VALUES (?1, ?2, ?3, ?4, ?5, 0)")
            .bind(&token.id)
            .bind(name)
            .bind(token_hash)
            .bind(millis(token.created_at))
            .bind(scope.as_str())
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        Ok(token)
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT id, name, scope, legacy, created_at, last_used_at, revoked_at FROM api_tokens ORDER BY created_at DESC, id DESC")
            .fetch_all(&self.readers)
            .await
            .map_err(backend)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(millis(Utc::now()))
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn find_token(&self, token_hash: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query(
            "UPDATE api_tokens SET last_used_at = ?2 WHERE hash = ?1 AND revoked_at IS NULL
             RETURNING id, name, scope, legacy, created_at, last_used_at, revoked_at",
        )
        .bind(token_hash)
        .bind(millis(Utc::now()))
        .fetch_optional(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn create_session(
        &self,
        session_hash: &str,
        csrf: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        let now = millis(Utc::now());
        sqlx::query("DELETE FROM sessions WHERE expires_at < ?1")
            .bind(now)
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        sqlx::query(
            "INSERT INTO sessions (hash, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(session_hash)
        .bind(csrf)
        .bind(now)
        .bind(millis(expires_at))
        .execute(&mut *self.writer.lock().await)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn find_session(&self, session_hash: &str) -> Result<Option<Session>> {
        let row = sqlx::query(
            "SELECT csrf, expires_at FROM sessions WHERE hash = ?1 AND expires_at > ?2",
        )
        .bind(session_hash)
        .bind(millis(Utc::now()))
        .fetch_optional(&self.readers)
        .await
        .map_err(backend)?;
        Ok(row.map(|r| Session {
            csrf: r.get(0),
            expires_at: from_millis(Some(r.get(1))).unwrap_or_default(),
        }))
    }

    async fn delete_session(&self, session_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE hash = ?1")
            .bind(session_hash)
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn delete_sessions_except(&self, keep: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE hash != ?1")
            .bind(keep)
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn create_login_link(&self, link_hash: &str, expires_at: DateTime<Utc>) -> Result<()> {
        sqlx::query("INSERT INTO login_links (hash, expires_at) VALUES (?1, ?2)")
            .bind(link_hash)
            .bind(millis(expires_at))
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn use_login_link(&self, link_hash: &str) -> Result<bool> {
        let now = millis(Utc::now());
        let done = sqlx::query("UPDATE login_links SET used_at = ?2 WHERE hash = ?1 AND used_at IS NULL AND expires_at > ?2")
            .bind(link_hash)
            .bind(now)
            .execute(&mut *self.writer.lock().await)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }
}
