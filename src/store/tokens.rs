//! Admin API tokens as stored: SHA-256 hashes with a name and a role.

use crate::base::clock::now_unix;
use crate::base::crypto;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May read and change everything.
    Admin,
    /// May read: check, lists, the request log, export.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// A stored token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl Store {
    pub async fn create_admin_token(
        &self,
        name: &str,
        role: Role,
        token: &str,
    ) -> Result<TokenInfo, StoreError> {
        let info = TokenInfo {
            id: crypto::random_id("tok"),
            name: name.to_owned(),
            role,
            created_at: now_unix(),
            revoked_at: None,
        };
        let mut tx = self.begin_write().await?;
        let taken: Option<String> =
            sqlx::query_scalar("SELECT id FROM admin_tokens WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "an admin token named {name:?} exists; pick another name"
            )));
        }
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, role, token_hash, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&info.id)
        .bind(name)
        .bind(role.as_str())
        .bind(crypto::hash_key(token.as_bytes()).as_slice())
        .bind(info.created_at)
        .execute(&mut *tx)
        .await?;
        self.bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(info)
    }

    pub async fn list_admin_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, name, role, created_at, revoked_at FROM admin_tokens
             ORDER BY created_at, name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(id, name, role, created_at, revoked_at)| {
                Ok(TokenInfo {
                    role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
                        table: "admin_tokens",
                        problem: format!("role {role:?}"),
                    })?,
                    id,
                    name,
                    created_at,
                    revoked_at,
                })
            })
            .collect()
    }

    /// `Ok(true)` if it was revoked already.
    pub async fn revoke_admin_token(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let revoked: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM admin_tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        match revoked {
            None => Err(StoreError::NotFound(format!(
                "no admin token with id {id:?}"
            ))),
            Some(Some(_)) => Ok(true),
            Some(None) => {
                sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2")
                    .bind(now_unix())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                self.bump_version(&mut tx).await?;
                tx.commit().await?;
                Ok(false)
            }
        }
    }

    /// Each live token's hash, role and name.
    pub async fn admin_token_hashes(&self) -> Result<Vec<([u8; 32], (Role, String))>, StoreError> {
        let rows: Vec<(Vec<u8>, String, String)> = sqlx::query_as(
            "SELECT token_hash, role, name FROM admin_tokens WHERE revoked_at IS NULL",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(hash, role, name)| {
                let corrupt = |problem: String| StoreError::Corrupt {
                    table: "admin_tokens",
                    problem,
                };
                Ok((
                    hash.try_into()
                        .map_err(|_| corrupt("a token hash is not 32 bytes".into()))?,
                    (
                        Role::parse(&role).ok_or_else(|| corrupt(format!("role {role:?}")))?,
                        name,
                    ),
                ))
            })
            .collect()
    }
}
