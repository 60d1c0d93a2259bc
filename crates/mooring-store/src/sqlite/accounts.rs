//! [`AccountStore`] for SQLite: users, login sessions and login-failure counters.

use rusqlite::{params, OptionalExtension, Row};

use super::tokens::{opt_ts_to_sql, opt_u64_column, role_column};
use super::{
    bound_to_sql, count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db,
    SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{check_text, window_open_since, SessionRecord, UserRecord};
use crate::store::AccountStore;

const USER_COLUMNS: &str = "id, email, role, scope, password_hash, password_set_sha256, \
     password_set_expires_at_ms, disabled, oidc_subject, created_at_ms, updated_at_ms";

const SESSION_COLUMNS: &str = "id_sha256, user_id, csrf_sha256, created_at_ms, last_used_at_ms, \
     expires_at_ms, source, user_agent";

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: row.get(0)?,
        email: row.get(1)?,
        role: role_column(row, 2)?,
        scope: row.get(3)?,
        password_hash: row.get(4)?,
        password_set_sha256: row.get(5)?,
        password_set_expires_at_ms: opt_u64_column(row, 6)?,
        disabled: row.get::<_, i64>(7)? != 0,
        oidc_subject: row.get(8)?,
        created_at_ms: u64_column(row, 9)?,
        updated_at_ms: u64_column(row, 10)?,
    })
}

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id_sha256: row.get(0)?,
        user_id: row.get(1)?,
        csrf_sha256: row.get(2)?,
        created_at_ms: u64_column(row, 3)?,
        last_used_at_ms: u64_column(row, 4)?,
        expires_at_ms: u64_column(row, 5)?,
        source: row.get(6)?,
        user_agent: row.get(7)?,
    })
}

/// The user's columns as SQL values, in [`USER_COLUMNS`] order.
struct UserRow {
    u: UserRecord,
    set_expires: Option<i64>,
    created: i64,
    updated: i64,
}

impl UserRow {
    fn new(u: UserRecord) -> Result<Self> {
        Ok(Self {
            set_expires: opt_ts_to_sql("password_set_expires_at_ms", u.password_set_expires_at_ms)?,
            created: ts_to_sql("created_at_ms", u.created_at_ms)?,
            updated: ts_to_sql("updated_at_ms", u.updated_at_ms)?,
            u,
        })
    }
}

fn taken(e: rusqlite::Error, u: &UserRecord) -> StoreError {
    if is_constraint_violation(&e) {
        StoreError::AlreadyExists(format!(
            "user {} (its id, email, password-set link or OIDC identity is taken)",
            u.email
        ))
    } else {
        store_error(e)
    }
}

impl SqliteStore {
    async fn find_user_by(&self, column: &'static str, value: &str) -> Result<Option<UserRecord>> {
        let value = value.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE {column} = ?1"
            ))
            .db()?
            .query_row(params![value], user_from_row)
            .optional()
            .db()
        })
        .await
    }
}

#[async_trait::async_trait]
impl AccountStore for SqliteStore {
    async fn create_user(&self, u: UserRecord) -> Result<()> {
        u.check_text()?;
        let r = UserRow::new(u)?;
        self.write(move |conn| {
            let u = &r.u;
            conn.execute(
                &format!(
                    "INSERT INTO users ({USER_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                ),
                params![
                    u.id,
                    u.email,
                    u.role.as_str(),
                    u.scope,
                    u.password_hash,
                    u.password_set_sha256,
                    r.set_expires,
                    i64::from(u.disabled),
                    u.oidc_subject,
                    r.created,
                    r.updated
                ],
            )
            .map_err(|e| taken(e, u))?;
            Ok(())
        })
        .await
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
        let after = after_email.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {USER_COLUMNS} FROM users WHERE email > ?1 ORDER BY email LIMIT ?2"
                ))
                .db()?;
            let rows = stmt.query_map(params![after, limit], user_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn update_user(&self, u: UserRecord) -> Result<bool> {
        u.check_text()?;
        let r = UserRow::new(u)?;
        self.write(move |conn| {
            let u = &r.u;
            let n = conn
                .execute(
                    "UPDATE users SET email = ?2, role = ?3, scope = ?4, password_hash = ?5,
                        password_set_sha256 = ?6, password_set_expires_at_ms = ?7, disabled = ?8,
                        oidc_subject = ?9, created_at_ms = ?10, updated_at_ms = ?11
                     WHERE id = ?1",
                    params![
                        u.id,
                        u.email,
                        u.role.as_str(),
                        u.scope,
                        u.password_hash,
                        u.password_set_sha256,
                        r.set_expires,
                        i64::from(u.disabled),
                        u.oidc_subject,
                        r.created,
                        r.updated
                    ],
                )
                .map_err(|e| taken(e, u))?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_user(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |conn| {
            // Sessions go with the user (ON DELETE CASCADE).
            let n = conn
                .execute("DELETE FROM users WHERE id = ?1", params![id])
                .db()?;
            Ok(n > 0)
        })
        .await
    }

    async fn create_session(&self, s: SessionRecord, per_user_max: usize) -> Result<()> {
        s.check_text()?;
        let created = ts_to_sql("created_at_ms", s.created_at_ms)?;
        let used = ts_to_sql("last_used_at_ms", s.last_used_at_ms)?;
        let expires = ts_to_sql("expires_at_ms", s.expires_at_ms)?;
        let keep = count_to_sql(per_user_max.max(1));
        self.write(move |conn| {
            let exists: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM users WHERE id = ?1")
                .db()?
                .query_row(params![s.user_id], |r| r.get(0))
                .optional()
                .db()?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("user {}", s.user_id)));
            }
            conn.execute(
                &format!(
                    "INSERT INTO user_sessions ({SESSION_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    s.id_sha256,
                    s.user_id,
                    s.csrf_sha256,
                    created,
                    used,
                    expires,
                    s.source,
                    s.user_agent
                ],
            )
            .map_err(|e| {
                if is_constraint_violation(&e) {
                    StoreError::AlreadyExists("session".to_owned())
                } else {
                    store_error(e)
                }
            })?;
            conn.execute(
                "DELETE FROM user_sessions WHERE user_id = ?1 AND id_sha256 NOT IN (
                     SELECT id_sha256 FROM user_sessions WHERE user_id = ?1
                     ORDER BY last_used_at_ms DESC, created_at_ms DESC, id_sha256 DESC LIMIT ?2)",
                params![s.user_id, keep],
            )
            .db()?;
            Ok(())
        })
        .await
    }

    async fn find_session(&self, id_sha256: &str) -> Result<Option<SessionRecord>> {
        let id = id_sha256.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM user_sessions WHERE id_sha256 = ?1"
            ))
            .db()?
            .query_row(params![id], session_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn touch_session(&self, id_sha256: &str, at_ms: u64) -> Result<()> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = id_sha256.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE user_sessions SET last_used_at_ms = max(last_used_at_ms, ?2)
                 WHERE id_sha256 = ?1",
            )
            .db()?
            .execute(params![id, at])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn delete_session(&self, id_sha256: &str) -> Result<bool> {
        let id = id_sha256.to_owned();
        self.write(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM user_sessions WHERE id_sha256 = ?1",
                    params![id],
                )
                .db()?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_user_sessions(&self, user_id: &str) -> Result<u64> {
        let id = user_id.to_owned();
        self.write(move |conn| {
            let n = conn
                .execute("DELETE FROM user_sessions WHERE user_id = ?1", params![id])
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    async fn delete_expired_sessions(
        &self,
        idle_before_ms: u64,
        now_ms: u64,
        max_rows: usize,
    ) -> Result<u64> {
        let idle = bound_to_sql(idle_before_ms);
        let now = bound_to_sql(now_ms);
        let max = count_to_sql(max_rows);
        self.write_background(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM user_sessions WHERE id_sha256 IN (
                         SELECT id_sha256 FROM user_sessions
                         WHERE last_used_at_ms < ?1 OR expires_at_ms <= ?2 LIMIT ?3)",
                    params![idle, now, max],
                )
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    async fn record_login_failure(&self, key: &str, now_ms: u64, window_ms: u64) -> Result<u32> {
        check_text("login-failure key", key)?;
        let now = ts_to_sql("now_ms", now_ms)?;
        let window_open_since = window_open_since(now_ms, window_ms);
        let key = key.to_owned();
        self.write(move |conn| {
            let count: i64 = conn
                .prepare_cached(
                    "INSERT INTO login_failures (key, window_start_ms, count) VALUES (?1, ?2, 1)
                     ON CONFLICT (key) DO UPDATE SET
                        count = CASE WHEN window_start_ms >= ?3 THEN count + 1 ELSE 1 END,
                        window_start_ms = CASE WHEN window_start_ms >= ?3
                                          THEN window_start_ms ELSE excluded.window_start_ms END
                     RETURNING count",
                )
                .db()?
                .query_row(params![key, now, window_open_since], |r| r.get(0))
                .db()?;
            Ok(u32::try_from(count).unwrap_or(u32::MAX))
        })
        .await
    }

    async fn login_failures(&self, key: &str, now_ms: u64, window_ms: u64) -> Result<u32> {
        let window_open_since = window_open_since(now_ms, window_ms);
        let key = key.to_owned();
        self.read(move |conn| {
            let count: Option<i64> = conn
                .prepare_cached(
                    "SELECT count FROM login_failures WHERE key = ?1 AND window_start_ms >= ?2",
                )
                .db()?
                .query_row(params![key, window_open_since], |r| r.get(0))
                .optional()
                .db()?;
            Ok(count.map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX)))
        })
        .await
    }

    async fn clear_login_failures(&self, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn| {
            conn.execute("DELETE FROM login_failures WHERE key = ?1", params![key])
                .db()?;
            Ok(())
        })
        .await
    }

    async fn prune_login_failures(&self, before_ms: u64) -> Result<u64> {
        let before = bound_to_sql(before_ms);
        self.write_background(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM login_failures WHERE window_start_ms < ?1",
                    params![before],
                )
                .db()?;
            Ok(n as u64)
        })
        .await
    }
}
