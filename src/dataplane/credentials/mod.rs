//! Credentials made per request rather than stored whole: OAuth2 client-credentials
//! tokens, fetched and cached, and AWS Signature Version 4.

pub mod oauth2;
pub mod sigv4;
