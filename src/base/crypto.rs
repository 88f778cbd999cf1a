//! The single seam for secret material: the master key, AES-256-GCM sealing of target
//! secrets, proxy-key generation and hashing.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
/// The prefix that lets secret scanners spot a latchkey proxy key.
pub const KEY_PREFIX: &str = "lk_";
/// 24 base62 characters carry 142 bits of entropy (≥ 128 required).
const KEY_CHARS: usize = 24;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key must be 32 bytes, base64-encoded (make one with `latchkey keygen`)")]
    BadMasterKey,
    #[error(
        "cannot decrypt a stored secret: wrong master key or corrupted data (sealed under master key {sealed_with}, this master key is {current})"
    )]
    Open {
        sealed_with: String,
        current: String,
    },
}

/// The AES-256 key that seals every target secret. Its id, a fingerprint, is stored
/// beside each ciphertext so a rotation knows which key sealed what.
/// The key that seals secrets, and the keys it replaced: a secret sealed under a previous
/// key still opens (its key's id is stored beside it) until `latchkey rekey` re-seals it.
pub struct MasterKey {
    cipher: Aes256Gcm,
    id: String,
    previous: Vec<MasterKey>,
    /// Signs the audit's checkpoints; derived from the key, so every replica holds it.
    audit: AuditSigner,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({}, <redacted>)", self.id)
    }
}

impl MasterKey {
    /// A fresh master key, base64-encoded, as `latchkey keygen` prints it.
    pub fn generate() -> String {
        let bytes = Zeroizing::new(random_bytes::<32>());
        BASE64.encode(*bytes)
    }

    pub fn parse(encoded: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(
            BASE64
                .decode(encoded.trim())
                .map_err(|_| CryptoError::BadMasterKey)?,
        );
        if bytes.len() != 32 {
            return Err(CryptoError::BadMasterKey);
        }
        let digest = Sha256::new()
            .chain_update(b"latchkey master key id\0")
            .chain_update(&*bytes)
            .finalize();
        Ok(Self {
            cipher: Aes256Gcm::new_from_slice(&bytes).map_err(|_| CryptoError::BadMasterKey)?,
            id: hex(&digest[..6]),
            previous: Vec::new(),
            audit: AuditSigner::derive(&bytes),
        })
    }

    /// This key, still able to open what `previous` sealed.
    pub fn with_previous(mut self, previous: Vec<MasterKey>) -> Self {
        self.previous = previous.into_iter().filter(|p| p.id != self.id).collect();
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn audit_signer(&self) -> &AuditSigner {
        &self.audit
    }

    /// The public keys that checkpoints may be signed with: this key's, then those of
    /// the keys it replaced (a checkpoint signed before a rotation still verifies).
    pub fn audit_public_keys(&self) -> Vec<AuditPublicKey> {
        std::iter::once(self)
            .chain(&self.previous)
            .map(|k| k.audit.public_key())
            .collect()
    }

    /// Seals `plaintext` bound to `aad` (the credential id): nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`seal`](Self::seal) produced; fails (never returns garbage) on a wrong
    /// key, a wrong `aad` or tampered bytes.
    pub fn open(
        &self,
        aad: &str,
        sealed: &[u8],
        sealed_with: &str,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let err = || CryptoError::Open {
            sealed_with: sealed_with.to_owned(),
            current: self.id.clone(),
        };
        if sealed.len() < NONCE_LEN {
            return Err(err());
        }
        // The key the secret says it was sealed with; this one if it names no other.
        let key = self
            .previous
            .iter()
            .find(|p| p.id == sealed_with)
            .unwrap_or(self);
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: aad.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| err())
    }
}

/// The Ed25519 key that signs the audit's checkpoints. Its seed is an HMAC of the master
/// key, so it needs no storage of its own, and its public half lets anyone check a
/// checkpoint without being able to forge one.
#[derive(Clone)]
pub struct AuditSigner {
    pair: Arc<Ed25519KeyPair>,
}

impl std::fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditSigner({})", self.public_key().id)
    }
}

/// A checkpoint signer's public half: the raw Ed25519 key and a short id, stored beside
/// each signature so a verifier knows which key to check it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPublicKey {
    pub id: String,
    pub key: Vec<u8>,
}

impl AuditSigner {
    fn derive(master: &[u8]) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes any key");
        mac.update(b"latchkey audit checkpoints v1");
        let seed = Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()));
        let pair =
            Ed25519KeyPair::from_seed_unchecked(&*seed).expect("any 32 bytes are an Ed25519 seed");
        Self {
            pair: Arc::new(pair),
        }
    }

    /// A signer of its own, for tests and benchmarks that have no master key.
    pub fn ephemeral() -> Self {
        Self::derive(&random_bytes::<32>())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    pub fn public_key(&self) -> AuditPublicKey {
        let key = self.pair.public_key().as_ref().to_vec();
        AuditPublicKey {
            id: hex(&Sha256::digest(&key)[..6]),
            key,
        }
    }
}

impl AuditPublicKey {
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.key)
            .verify(message, signature)
            .is_ok()
    }
}

/// SHA-256, in lowercase hex.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut digest = Sha256::new();
    for part in parts {
        digest.update(part);
    }
    hex(&digest.finalize())
}

/// A new proxy key: `lk_` and 24 base62 characters.
pub fn new_proxy_key() -> String {
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_CHARS);
    key.push_str(KEY_PREFIX);
    while key.len() < KEY_PREFIX.len() + KEY_CHARS {
        for b in random_bytes::<32>() {
            // Rejection sampling keeps every character uniformly likely.
            if b < 248 && key.len() < KEY_PREFIX.len() + KEY_CHARS {
                key.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    key
}

/// Proxy keys are stored and looked up only by this hash.
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A random identifier such as `cred_3f9a…`: unguessable, never derived from a secret.
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex(&random_bytes::<8>()))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// What [`hex`] wrote, back in bytes; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the operating system's random source failed");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::parse(&MasterKey::generate()).unwrap()
    }

    #[test]
    fn seal_open_round_trip_and_fresh_nonce() {
        let k = key();
        let a = k.seal("cred_1", b"sk_live_secret");
        let b = k.seal("cred_1", b"sk_live_secret");
        assert_ne!(a, b, "each seal uses a fresh nonce");
        assert!(!a.windows(14).any(|w| w == b"sk_live_secret"));
        assert_eq!(&*k.open("cred_1", &a, k.id()).unwrap(), b"sk_live_secret");
    }

    #[test]
    fn wrong_key_wrong_aad_or_tampering_fail_clearly() {
        let k = key();
        let sealed = k.seal("cred_1", b"secret");
        let other = key();
        let err = other.open("cred_1", &sealed, k.id()).unwrap_err();
        assert!(err.to_string().contains("wrong master key"), "{err}");
        assert!(k.open("cred_2", &sealed, k.id()).is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(k.open("cred_1", &tampered, k.id()).is_err());
        assert!(k.open("cred_1", &sealed[..5], k.id()).is_err());
    }

    #[test]
    fn a_new_key_opens_what_the_previous_sealed_until_rekeyed() {
        let old = key();
        let sealed = old.seal("cred_1", b"sk_live");
        let old_id = old.id().to_owned();
        let new = key().with_previous(vec![old]);
        assert_eq!(&*new.open("cred_1", &sealed, &old_id).unwrap(), b"sk_live");
        let resealed = new.seal("cred_1", b"sk_live");
        assert_eq!(
            &*new.open("cred_1", &resealed, new.id()).unwrap(),
            b"sk_live"
        );
        // Without the previous key: a clear refusal.
        assert!(key().open("cred_1", &sealed, &old_id).is_err());
    }

    #[test]
    fn a_master_key_prints_only_its_id() {
        let text = MasterKey::generate();
        let key = MasterKey::parse(&text).unwrap();
        let printed = format!("{key:?}");
        assert!(printed.contains("<redacted>") && !printed.contains(text.trim()));
    }

    #[test]
    fn master_key_parsing() {
        assert!(MasterKey::parse("not base64!").is_err());
        assert!(MasterKey::parse(&BASE64.encode([0u8; 16])).is_err());
        let text = MasterKey::generate();
        assert_eq!(
            MasterKey::parse(&text).unwrap().id(),
            MasterKey::parse(&format!("{text}\n")).unwrap().id()
        );
        assert!(!format!("{:?}", key()).contains(&text));
    }

    #[test]
    fn checkpoint_signatures_verify_under_the_key_they_were_made_with() {
        let old = key();
        let signed = old.audit_signer().sign(b"checkpoint");
        let old_public = old.audit_signer().public_key();
        assert!(old_public.verifies(b"checkpoint", &signed));
        assert!(!old_public.verifies(b"checkpoinT", &signed));
        // The same master key derives the same signer (every replica signs alike).
        let text = MasterKey::generate();
        let (a, b) = (
            MasterKey::parse(&text).unwrap(),
            MasterKey::parse(&text).unwrap(),
        );
        assert_eq!(a.audit_signer().public_key(), b.audit_signer().public_key());
        // After a rotation the previous key's public half is still offered.
        let new = key().with_previous(vec![old]);
        let keys = new.audit_public_keys();
        assert_eq!(keys.len(), 2);
        assert!(keys[1].verifies(b"checkpoint", &signed));
        assert!(!keys[0].verifies(b"checkpoint", &signed));
    }

    #[test]
    fn proxy_keys_look_right_and_differ() {
        let a = new_proxy_key();
        assert_eq!(a.len(), 27);
        assert!(a.starts_with("lk_"));
        assert!(a[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, new_proxy_key());
    }
}
