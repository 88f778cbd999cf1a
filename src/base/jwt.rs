//! JSON Web Tokens and Keys, as far as a workload's identity needs them: the asymmetric
//! algorithms only (no `none`, no HMAC, so a public key can never be used as a shared
//! secret), verified with `ring`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm};
use serde::Deserialize;

/// The longest token latchkey reads: projected service-account tokens are ~1 KiB.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Whether `key` has a JWT's shape: three base64url segments, the first a JSON object
/// (`eyJ`), within [`MAX_TOKEN_LEN`]. Proxy keys (`lk_…`) never do.
pub fn looks_like(key: &[u8]) -> bool {
    key.len() <= MAX_TOKEN_LEN
        && key.starts_with(b"eyJ")
        && key.iter().filter(|&&b| b == b'.').count() == 2
        && key
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The signing algorithms accepted, each with the key type it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A token split and decoded, its signature not yet checked.
#[derive(Debug)]
pub struct Token<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Claims,
    /// `header.payload`: what the signature covers.
    signed: &'a [u8],
    signature: Vec<u8>,
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// A token naming its own key (`jwk`, `jku`, `x5u`, `x5c`) is refused: the key is the
    /// issuer's to publish, never the token's to bring.
    #[serde(default)]
    jwk: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    jku: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    x5u: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    x5c: Option<serde::de::IgnoredAny>,
    /// Critical extensions latchkey does not know: refused, as RFC 7515 says.
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub aud: Option<Audience>,
    #[serde(default)]
    pub exp: Option<f64>,
    #[serde(default)]
    pub nbf: Option<f64>,
    /// Every claim, for the credential's claim conditions.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(a) => a == audience,
            Audience::Many(list) => list.iter().any(|a| a == audience),
        }
    }
}

/// Why a token is refused: the words go into `invalid_key`'s reason.
pub type Refusal = &'static str;

impl<'a> Token<'a> {
    pub fn parse(token: &'a [u8]) -> Result<Self, Refusal> {
        if !looks_like(token) {
            return Err("not a token");
        }
        let mut parts = token.splitn(3, |&b| b == b'.');
        let (Some(header), Some(payload), Some(signature)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err("not a token");
        };
        let decode = |part: &[u8]| B64URL.decode(part).map_err(|_| "token encoding");
        let header: Header =
            serde_json::from_slice(&decode(header)?).map_err(|_| "token header")?;
        if header.jwk.is_some() || header.jku.is_some() || header.x5u.is_some() {
            return Err("token names its own key");
        }
        if header.x5c.is_some() || header.crit.is_some() {
            return Err("token header");
        }
        let alg = Alg::parse(&header.alg).ok_or("token algorithm not accepted")?;
        let claims: Claims =
            serde_json::from_slice(&decode(payload)?).map_err(|_| "token claims")?;
        let signed = &token[..token.len() - signature.len() - 1];
        Ok(Token {
            alg,
            kid: header.kid,
            claims,
            signed,
            signature: decode(signature)?,
        })
    }

    /// Whether `key` signed this token.
    pub fn signed_by(&self, key: &Jwk) -> bool {
        if key.alg.as_deref().is_some_and(|a| a != self.alg.name()) {
            return false;
        }
        let rsa = |alg: &'static signature::RsaParameters| match &key.material {
            Material::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(alg, self.signed, &self.signature)
                .is_ok(),
            _ => false,
        };
        let point = |alg: &'static dyn VerificationAlgorithm, curve: &str| match &key.material {
            Material::Ec { crv, point } if crv == curve => UnparsedPublicKey::new(alg, point)
                .verify(self.signed, &self.signature)
                .is_ok(),
            _ => false,
        };
        match self.alg {
            Alg::Rs256 => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
            Alg::Rs384 => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
            Alg::Rs512 => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
            Alg::Ps256 => rsa(&signature::RSA_PSS_2048_8192_SHA256),
            Alg::Ps384 => rsa(&signature::RSA_PSS_2048_8192_SHA384),
            Alg::Ps512 => rsa(&signature::RSA_PSS_2048_8192_SHA512),
            Alg::Es256 => point(&signature::ECDSA_P256_SHA256_FIXED, "P-256"),
            Alg::Es384 => point(&signature::ECDSA_P384_SHA384_FIXED, "P-384"),
            Alg::EdDsa => match &key.material {
                Material::Okp { x } => UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(self.signed, &self.signature)
                    .is_ok(),
                _ => false,
            },
        }
    }
}

/// One public key of an issuer's key set.
#[derive(Debug, Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    pub alg: Option<String>,
    material: Material,
}

#[derive(Debug, Clone)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point: `04 || x || y`.
    Ec {
        crv: String,
        point: Vec<u8>,
    },
    Okp {
        x: Vec<u8>,
    },
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// The signature keys of a JWKS document. Keys of other types (`oct` above all: a shared
/// secret has no place in a public set) or for encryption are skipped.
pub fn key_set(json: &[u8]) -> Result<Vec<Jwk>, String> {
    let raw: RawSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
    let decode = |v: &Option<String>| v.as_deref().and_then(|s| B64URL.decode(s).ok());
    let mut out = Vec::new();
    for k in raw.keys {
        if k.usage.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let material = match (k.kty.as_str(), k.crv.as_deref()) {
            ("RSA", _) => match (decode(&k.n), decode(&k.e)) {
                (Some(n), Some(e)) => Material::Rsa { n, e },
                _ => continue,
            },
            ("EC", Some(crv @ ("P-256" | "P-384"))) => match (decode(&k.x), decode(&k.y)) {
                (Some(x), Some(y)) => {
                    let mut point = Vec::with_capacity(1 + x.len() + y.len());
                    point.push(4);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    Material::Ec {
                        crv: crv.to_owned(),
                        point,
                    }
                }
                _ => continue,
            },
            ("OKP", Some("Ed25519")) => match decode(&k.x) {
                Some(x) => Material::Okp { x },
                None => continue,
            },
            _ => continue,
        };
        out.push(Jwk {
            kid: k.kid,
            alg: k.alg,
            material,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    fn es256() -> (EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
            "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..]),
        }]});
        (pair, jwks.to_string())
    }

    fn sign(pair: &EcdsaKeyPair, header: &str, claims: &str) -> String {
        let signed = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let sig = pair.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", B64URL.encode(sig.as_ref()))
    }

    #[test]
    fn an_es256_token_verifies_against_its_key_only() {
        let (pair, jwks) = es256();
        let (_, other) = es256();
        let keys = key_set(jwks.as_bytes()).unwrap();
        let others = key_set(other.as_bytes()).unwrap();
        let claims = r#"{"iss":"i","sub":"s","aud":["a","b"],"exp":2000000000}"#;
        let token = sign(&pair, r#"{"alg":"ES256","kid":"k1"}"#, claims);
        let parsed = Token::parse(token.as_bytes()).unwrap();
        assert!(parsed.signed_by(&keys[0]));
        assert!(!parsed.signed_by(&others[0]));
        assert!(parsed.claims.aud.as_ref().unwrap().contains("b"));
        // A claim changed after signing.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64URL.encode(claims.replace("\"s\"", "\"t\""));
        parts[1] = &forged;
        let forged = parts.join(".");
        assert!(!Token::parse(forged.as_bytes()).unwrap().signed_by(&keys[0]));
    }

    #[test]
    fn unsafe_headers_are_refused() {
        let (pair, _) = es256();
        let claims = r#"{"sub":"s"}"#;
        for (header, why) in [
            (r#"{"alg":"none"}"#, "token algorithm not accepted"),
            (r#"{"alg":"HS256"}"#, "token algorithm not accepted"),
            (
                r#"{"alg":"ES256","jku":"https://evil"}"#,
                "token names its own key",
            ),
            (r#"{"alg":"ES256","jwk":{}}"#, "token names its own key"),
            (r#"{"alg":"ES256","crit":["x"]}"#, "token header"),
        ] {
            let token = sign(&pair, header, claims);
            assert_eq!(Token::parse(token.as_bytes()).unwrap_err(), why, "{header}");
        }
        // `alg: none` with an empty signature has no third segment content at all.
        let none = format!(
            "{}.{}.",
            B64URL.encode(r#"{"alg":"none"}"#),
            B64URL.encode(claims)
        );
        assert!(Token::parse(none.as_bytes()).is_err());
    }

    #[test]
    fn shared_secrets_and_encryption_keys_are_not_signature_keys() {
        let set = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"},
            {"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}"#;
        assert!(key_set(set.as_bytes()).unwrap().is_empty());
    }

    proptest::proptest! {
        /// Hostile tokens: any bytes, or three segments of any base64url, never panic;
        /// and whatever parses is never signed by a key that did not sign it.
        #[test]
        fn hostile_tokens_are_refused_quietly(
            header in "[A-Za-z0-9_-]{0,80}",
            claims in "[A-Za-z0-9_-]{0,120}",
            signature in "[A-Za-z0-9_-]{0,90}",
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let _ = Token::parse(&raw);
            let token = format!("eyJ{header}.{claims}.{signature}");
            if let Ok(parsed) = Token::parse(token.as_bytes()) {
                let keys = key_set(KEYS.as_bytes()).unwrap();
                proptest::prop_assert!(keys.iter().all(|k| !parsed.signed_by(k)));
            }
        }

        /// Made-up headers with a real algorithm and made-up claims parse or are refused,
        /// never trusted.
        #[test]
        fn forged_structures_never_verify(alg in "(RS256|ES256|PS256|EdDSA|ES384)", sub in ".{0,40}") {
            let header = B64URL.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
            let body = B64URL.encode(serde_json::json!({"sub": sub, "exp": 4e9}).to_string());
            let token = format!("{header}.{body}.{}", B64URL.encode([7u8; 64]));
            let parsed = Token::parse(token.as_bytes()).unwrap();
            let keys = key_set(KEYS.as_bytes()).unwrap();
            proptest::prop_assert!(keys.iter().all(|k| !parsed.signed_by(k)));
        }
    }

    /// An EC and an Ed25519 public key, for the properties above.
    const KEYS: &str = r#"{"keys":[
        {"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty":"OKP","crv":"Ed25519","kid":"k2","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    #[test]
    fn shapes() {
        assert!(looks_like(b"eyJhbGciOi.eyJzdWIi.c2ln"));
        assert!(!looks_like(b"lk_abcdefghijklmnopqrstuv"));
        assert!(!looks_like(b"eyJ.a.b.c"));
        assert!(!looks_like(b"eyJ a.b.c"));
    }
}
