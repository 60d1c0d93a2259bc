//! [`AccountStore`] for PostgreSQL: users, login sessions and login-failure counters, shared by
//! every server on the database (a session cookie or a failure count is the same on each).

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{
    column, count_to_sql, is_unique_violation, nul_free_cursor, opt_ts_to_sql, opt_u64_column,
    pg_error, role_column, ts_to_sql, u32_column, u64_column, PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{check_text, window_open_since, SessionRecord, UserRecord};
use crate::store::AccountStore;

const USER_COLUMNS: &str = "id, email, role, scope, password_hash, password_set_sha256, \
     password_set_expires_at_ms, disabled, oidc_subject, created_at_ms, updated_at_ms";

const SESSION_COLUMNS: &str = "id_sha256, user_id, csrf_sha256, created_at_ms, last_used_at_ms, \
     expires_at_ms, source, user_agent";

fn user_from_row(row: &Row) -> Result<UserRecord> {
    Ok(UserRecord {
        id: column(row, 0)?,
        email: column(row, 1)?,
        role: role_column(row, 2)?,
        scope: column(row, 3)?,
        password_hash: column(row, 4)?,
        password_set_sha256: column(row, 5)?,
        password_set_expires_at_ms: opt_u64_column(row, 6)?,
        disabled: column(row, 7)?,
        oidc_subject: column(row, 8)?,
        created_at_ms: u64_column(row, 9)?,
        updated_at_ms: u64_column(row, 10)?,
    })
}

fn session_from_row(row: &Row) -> Result<SessionRecord> {
    Ok(SessionRecord {
        id_sha256: column(row, 0)?,
        user_id: column(row, 1)?,
        csrf_sha256: column(row, 2)?,
        created_at_ms: u64_column(row, 3)?,
        last_used_at_ms: u64_column(row, 4)?,
        expires_at_ms: u64_column(row, 5)?,
        source: column(row, 6)?,
        user_agent: column(row, 7)?,
    })
}

fn user_taken(u: &UserRecord) -> String {
    format!(
        "user {} (its id, email, password-set link or OIDC identity is taken)",
        u.email
    )
}

/// The user's times as stored: (password-set expiry, created, updated).
fn user_times(u: &UserRecord) -> Result<(Option<i64>, i64, i64)> {
    Ok((
        opt_ts_to_sql("password_set_expires_at_ms", u.password_set_expires_at_ms)?,
        ts_to_sql("created_at_ms", u.created_at_ms)?,
        ts_to_sql("updated_at_ms", u.updated_at_ms)?,
    ))
}

impl PgStore {
    /// The user whose `column` is `value`; none if `value` holds U+0000 (no stored text does).
    async fn find_user_by(&self, column: &'static str, value: &str) -> Result<Option<UserRecord>> {
        if check_text(column, value).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE {column} = $1");
        let row = self.query_opt(&sql, &[&value]).await?;
        row.as_ref().map(user_from_row).transpose()
    }
}

#[async_trait::async_trait]
impl AccountStore for PgStore {
    async fn create_user(&self, u: UserRecord) -> Result<()> {
        u.check_text()?;
        let (set_expires, created, updated) = user_times(&u)?;
        self.execute(
            &format!(
                "INSERT INTO users ({USER_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            &[
                &u.id,
                &u.email,
                &u.role.as_str(),
                &u.scope,
                &u.password_hash,
                &u.password_set_sha256,
                &set_expires,
                &u.disabled,
                &u.oidc_subject,
                &created,
                &updated,
            ],
            || user_taken(&u),
        )
        .await?;
        Ok(())
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>> {
        self.find_user_by("id", id).await
    }

    async fn find_user_by_email(&self, email: &str) -> Result<Option<UserRecord>> {
        self.find_user_by("email", email).await
    }

    async fn find_user_by_password_set(&self, sha256: &str) -> Result<Option<UserRecord>> {
        self.find_user_by("password_set_sha256", sha256).await
    }

    async fn find_user_by_oidc_subject(&self, subject: &str) -> Result<Option<UserRecord>> {
        self.find_user_by("oidc_subject", subject).await
    }

    async fn list_users(&self, limit: usize, after_email: Option<&str>) -> Result<Vec<UserRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Emails are COLLATE "C": byte order, as in SQLite.
        let after = nul_free_cursor(after_email.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql =
            format!("SELECT {USER_COLUMNS} FROM users WHERE email > $1 ORDER BY email LIMIT $2");
        let rows = self.query(&sql, &[&after, &limit]).await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn update_user(&self, u: UserRecord) -> Result<bool> {
        u.check_text()?;
        let (set_expires, created, updated) = user_times(&u)?;
        let n = self
            .execute(
                "UPDATE users SET email = $2, role = $3, scope = $4, password_hash = $5,
                    password_set_sha256 = $6, password_set_expires_at_ms = $7, disabled = $8,
                    oidc_subject = $9, created_at_ms = $10, updated_at_ms = $11
                 WHERE id = $1",
                &[
                    &u.id,
                    &u.email,
                    &u.role.as_str(),
                    &u.scope,
                    &u.password_hash,
                    &u.password_set_sha256,
                    &set_expires,
                    &u.disabled,
                    &u.oidc_subject,
                    &created,
                    &updated,
                ],
                || user_taken(&u),
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_user(&self, id: &str) -> Result<bool> {
        if check_text("user id", id).is_err() {
            return Ok(false);
        }
        // Its sessions go with it (ON DELETE CASCADE).
        let n = self
            .execute("DELETE FROM users WHERE id = $1", &[&id], || {
                format!("user {id}")
            })
            .await?;
        Ok(n > 0)
    }

    /// One transaction that first locks the user's row (`FOR NO KEY UPDATE`): two servers
    /// creating sessions for one user at once take turns, so the cap holds across them, and the
    /// user cannot be deleted in between.
    async fn create_session(&self, s: SessionRecord, per_user_max: usize) -> Result<()> {
        s.check_text()?;
        let created = ts_to_sql("created_at_ms", s.created_at_ms)?;
        let used = ts_to_sql("last_used_at_ms", s.last_used_at_ms)?;
        let expires = ts_to_sql("expires_at_ms", s.expires_at_ms)?;
        let keep = count_to_sql(per_user_max.max(1));
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let lock = tx
            .prepare_cached("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
            .await
            .map_err(pg_error)?;
        if tx
            .query_opt(&lock, &[&s.user_id])
            .await
            .map_err(pg_error)?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("user {}", s.user_id)));
        }
        let insert = tx
            .prepare_cached(&format!(
                "INSERT INTO user_sessions ({SESSION_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .await
            .map_err(pg_error)?;
        let params: [&(dyn ToSql + Sync); 8] = [
            &s.id_sha256,
            &s.user_id,
            &s.csrf_sha256,
            &created,
            &used,
            &expires,
            &s.source,
            &s.user_agent,
        ];
        match tx.execute(&insert, &params).await {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists("session".to_owned()))
            }
            Err(e) => return Err(pg_error(e)),
        }
        let cap = tx
            .prepare_cached(
                "DELETE FROM user_sessions WHERE user_id = $1 AND id_sha256 NOT IN (
                     SELECT id_sha256 FROM user_sessions WHERE user_id = $1
                     ORDER BY last_used_at_ms DESC, created_at_ms DESC, id_sha256 DESC LIMIT $2)",
            )
            .await
            .map_err(pg_error)?;
        tx.execute(&cap, &[&s.user_id, &keep])
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn find_session(&self, id_sha256: &str) -> Result<Option<SessionRecord>> {
        if check_text("session id hash", id_sha256).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {SESSION_COLUMNS} FROM user_sessions WHERE id_sha256 = $1");
        let row = self.query_opt(&sql, &[&id_sha256]).await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn touch_session(&self, id_sha256: &str, at_ms: u64) -> Result<()> {
        let at = ts_to_sql("at_ms", at_ms)?;
        if check_text("session id hash", id_sha256).is_err() {
            return Ok(());
        }
        self.execute(
            "UPDATE user_sessions SET last_used_at_ms = GREATEST(last_used_at_ms, $2)
             WHERE id_sha256 = $1",
            &[&id_sha256, &at],
            || "session".to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn delete_session(&self, id_sha256: &str) -> Result<bool> {
        if check_text("session id hash", id_sha256).is_err() {
            return Ok(false);
        }
        let n = self
            .execute(
                "DELETE FROM user_sessions WHERE id_sha256 = $1",
                &[&id_sha256],
                || "session".to_owned(),
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_user_sessions(&self, user_id: &str) -> Result<u64> {
        if check_text("user id", user_id).is_err() {
            return Ok(0);
        }
        self.execute(
            "DELETE FROM user_sessions WHERE user_id = $1",
            &[&user_id],
            || "session".to_owned(),
        )
        .await
    }

    async fn delete_expired_sessions(
        &self,
        idle_before_ms: u64,
        now_ms: u64,
        max_rows: usize,
    ) -> Result<u64> {
        if max_rows == 0 {
            return Ok(0);
        }
        let idle = super::bound_to_sql(idle_before_ms);
        let now = super::bound_to_sql(now_ms);
        let max = count_to_sql(max_rows);
        // SKIP LOCKED: two servers sweeping at once take different rows.
        self.execute(
            "DELETE FROM user_sessions WHERE id_sha256 IN (
                 SELECT id_sha256 FROM user_sessions
                 WHERE last_used_at_ms < $1 OR expires_at_ms <= $2
                 LIMIT $3 FOR UPDATE SKIP LOCKED)",
            &[&idle, &now, &max],
            || "session".to_owned(),
        )
        .await
    }

    /// One statement: the insert or the update of the key's row is atomic (`ON CONFLICT DO
    /// UPDATE` locks the row), so failures counted at once on several servers are all counted.
    async fn record_login_failure(&self, key: &str, now_ms: u64, window_ms: u64) -> Result<u32> {
        check_text("login-failure key", key)?;
        let now = ts_to_sql("now_ms", now_ms)?;
        let open_since = window_open_since(now_ms, window_ms);
        let row = self
            .query_opt(
                "INSERT INTO login_failures AS f (key, window_start_ms, count) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO UPDATE SET
                    count = CASE WHEN f.window_start_ms >= $3 THEN f.count + 1 ELSE 1 END,
                    window_start_ms = CASE WHEN f.window_start_ms >= $3
                                      THEN f.window_start_ms ELSE EXCLUDED.window_start_ms END
                 RETURNING LEAST(count, 4294967295)",
                &[&key, &now, &open_since],
            )
            .await?
            .ok_or_else(|| StoreError::Backend("login failure upsert returned no row".into()))?;
        u32_column(&row, 0)
    }

    async fn login_failures(&self, key: &str, now_ms: u64, window_ms: u64) -> Result<u32> {
        if check_text("login-failure key", key).is_err() {
            return Ok(0);
        }
        let open_since = window_open_since(now_ms, window_ms);
        let row = self
            .query_opt(
                "SELECT LEAST(count, 4294967295) FROM login_failures
                 WHERE key = $1 AND window_start_ms >= $2",
                &[&key, &open_since],
            )
            .await?;
        row.map_or(Ok(0), |r| u32_column(&r, 0))
    }

    async fn clear_login_failures(&self, key: &str) -> Result<()> {
        if check_text("login-failure key", key).is_err() {
            return Ok(());
        }
        self.execute("DELETE FROM login_failures WHERE key = $1", &[&key], || {
            "login failures".to_owned()
        })
        .await?;
        Ok(())
    }

    async fn prune_login_failures(&self, before_ms: u64) -> Result<u64> {
        let before = super::bound_to_sql(before_ms);
        self.execute(
            "DELETE FROM login_failures WHERE window_start_ms < $1",
            &[&before],
            || "login failures".to_owned(),
        )
        .await
    }
}
