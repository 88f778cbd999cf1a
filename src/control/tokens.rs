//! Admin API tokens: who may call the admin API, and whether to change or only to read.
//! Tokens are stored as SHA-256 hashes and checked in constant time against an
//! in-memory table that every replica keeps current (`control::sync`). The bootstrap token
//! from `LATCHKEY_ADMIN_TOKEN` is always an admin.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tonic::{Request, Status};

use crate::base::crypto;
pub use crate::store::tokens::Role;
use crate::store::{Store, StoreError};

/// Live tokens by hash, swapped whole when they change.
#[derive(Clone, Default)]
pub struct Tokens {
    live: Arc<ArcSwap<HashMap<[u8; 32], Holder>>>,
}

/// A live token's role and name.
type Holder = (Role, String);

/// Who called, as recorded beside the role: the admin token's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenName(pub String);

impl Tokens {
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let live = store
            .admin_token_hashes()
            .await?
            .into_iter()
            .collect::<HashMap<_, _>>();
        self.live.store(Arc::new(live));
        Ok(())
    }

    fn role_of(&self, hash: &[u8; 32]) -> Option<(Role, String)> {
        // The map finds a candidate; the constant-time compare decides.
        let live = self.live.load();
        let (stored, who) = live.get_key_value(hash)?;
        crypto::ct_eq(stored, hash).then(|| who.clone())
    }
}

/// A new admin token: `lkadm_` and 32 base62 characters. Shown once.
pub fn new_token() -> String {
    let key = crypto::new_proxy_key();
    format!("lkadm_{}", &key[3..])
}

/// Checks the bearer token of every admin call and records its role in the request.
/// Without a bootstrap token and with no stored one, every call is refused.
#[derive(Clone)]
pub struct AdminAuth {
    bootstrap: Option<[u8; 32]>,
    tokens: Tokens,
}

impl AdminAuth {
    pub fn new(bootstrap: Option<&str>, tokens: Tokens) -> Self {
        Self {
            bootstrap: bootstrap
                .filter(|t| !t.is_empty())
                .map(|t| crypto::hash_key(t.as_bytes())),
            tokens,
        }
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <admin token>`")
            })?;
        let hash = crypto::hash_key(presented.trim().as_bytes());
        let who = match &self.bootstrap {
            Some(bootstrap) if crypto::ct_eq(bootstrap, &hash) => {
                Some((Role::Admin, "LATCHKEY_ADMIN_TOKEN".to_owned()))
            }
            _ => self.tokens.role_of(&hash),
        };
        let (role, name) =
            who.ok_or_else(|| Status::unauthenticated("unknown or revoked admin token"))?;
        request.extensions_mut().insert(role);
        request.extensions_mut().insert(TokenName(name));
        Ok(request)
    }
}

/// Refuses a change asked with a viewer token.
pub fn require_admin<T>(request: &Request<T>) -> Result<(), Status> {
    match request.extensions().get::<Role>() {
        Some(Role::Admin) => Ok(()),
        Some(Role::Viewer) => Err(Status::permission_denied(
            "this token is a viewer's: it may read, not change",
        )),
        None => Err(Status::unauthenticated("no admin token")),
    }
}
