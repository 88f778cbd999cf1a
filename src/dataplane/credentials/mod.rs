//! Credentials made per request rather than stored whole: OAuth2 client-credentials
//! tokens, fetched and cached, and AWS Signature Version 4; and the secrets the server
//! reads itself, as a compile takes them.

pub mod oauth2;
pub mod sigv4;

use std::collections::HashMap;

use zeroize::Zeroizing;

use crate::policy::ServerSource;

/// The secrets the server reads itself (mounted files, AWS Secrets Manager) as last
/// read, by where they are read: what a compile takes them from. Each is its value or
/// why it could not be read; `generation` moves whenever one changes.
#[derive(Default)]
pub struct ServerSecrets {
    pub values: HashMap<ServerSource, Result<Zeroizing<String>, String>>,
    pub generation: u64,
}
