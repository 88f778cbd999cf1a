//! AWS Signature Version 4: the request is signed as AWS services check it, so an agent
//! calls AWS through latchkey without ever holding an access key. The signature covers
//! the host, the path and query as they go upstream, the time and the payload hash.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::base::crypto::hex;

type HmacSha256 = Hmac<Sha256>;

/// What `x-amz-content-sha256` says when the payload is left out of the signature.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// RFC 3986's unreserved characters: what AWS leaves as it is.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
const UNRESERVED_AND_SLASH: &AsciiSet = &UNRESERVED.remove(b'/');

/// An AWS access key and where it signs. The secret never leaves this struct.
pub struct Signer {
    access_key_id: String,
    /// `AWS4` + the secret access key: the root of every day's signing key.
    root: Zeroizing<Vec<u8>>,
    session_token: Option<Zeroizing<String>>,
    region: String,
    service: String,
    unsigned_payload: bool,
    /// The signing key of the current UTC day, derived once a day rather than per request.
    day_key: ArcSwapOption<DayKey>,
}

struct DayKey {
    date: String,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// The parts of a request the signature covers.
pub struct Request<'a> {
    pub method: &'a str,
    /// The `Host` the upstream receives.
    pub authority: &'a str,
    /// Path and query, exactly as they go upstream.
    pub path: &'a str,
    /// The request body; `None` when the payload is not signed.
    pub body: Option<&'a [u8]>,
    /// Request headers signed besides latchkey's own (`content-type`, `x-amz-*`, …).
    pub headers: &'a [(&'a str, &'a str)],
}

impl Signer {
    pub fn new(
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
        region: &str,
        service: &str,
        unsigned_payload: bool,
    ) -> Self {
        Self {
            access_key_id: access_key_id.to_owned(),
            root: Zeroizing::new(format!("AWS4{secret_access_key}").into_bytes()),
            session_token: session_token.map(|t| Zeroizing::new(t.to_owned())),
            region: region.to_owned(),
            service: service.to_owned(),
            unsigned_payload,
            day_key: ArcSwapOption::empty(),
        }
    }

    /// Whether the body must be read before the request can be signed.
    pub fn signs_payload(&self) -> bool {
        !self.unsigned_payload
    }

    /// The secret material an upstream must never echo back to the agent.
    pub fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        let secret = &self.root[4..];
        std::iter::once(secret).chain(self.session_token.iter().map(|t| t.as_bytes()))
    }

    /// The headers that carry the signature, to be set on the request at `now` (Unix
    /// seconds).
    pub fn sign(&self, request: &Request<'_>, now: i64) -> Vec<(&'static str, Vec<u8>)> {
        let amz_date = amz_date(now);
        let payload_hash = match request.body {
            Some(body) if !self.unsigned_payload => hex(&Sha256::digest(body)),
            _ => UNSIGNED_PAYLOAD.to_owned(),
        };
        let mut headers = request.headers.to_vec();
        headers.extend([
            ("host", request.authority),
            ("x-amz-content-sha256", payload_hash.as_str()),
            ("x-amz-date", amz_date.as_str()),
        ]);
        if let Some(token) = &self.session_token {
            headers.push(("x-amz-security-token", token.as_str()));
        }
        let (canonical, signed_headers) = canonical_request(
            request.method,
            request.path,
            &headers,
            &payload_hash,
            self.service == "s3",
        );
        let date = &amz_date[..8];
        let scope = format!("{date}/{}/{}/aws4_request", self.region, self.service);
        let to_sign = string_to_sign(&amz_date, &scope, &canonical);
        let signature = hex(&hmac(&self.signing_key(date).key[..], to_sign.as_bytes()));
        let authorization = format!(
            "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access_key_id
        );
        let mut set = vec![
            ("authorization", authorization.into_bytes()),
            ("x-amz-content-sha256", payload_hash.into_bytes()),
            ("x-amz-date", amz_date.into_bytes()),
        ];
        if let Some(token) = &self.session_token {
            set.push(("x-amz-security-token", token.as_bytes().to_vec()));
        }
        set
    }

    fn signing_key(&self, date: &str) -> Arc<DayKey> {
        if let Some(day) = self.day_key.load_full()
            && day.date == date
        {
            return day;
        }
        let day = Arc::new(DayKey {
            date: date.to_owned(),
            key: Zeroizing::new(signing_key(&self.root, date, &self.region, &self.service)),
        });
        self.day_key.store(Some(day.clone()));
        day
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request").
fn signing_key(root: &[u8], date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(root, date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// `YYYYMMDDTHHMMSSZ`, UTC.
fn amz_date(now: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now.max(0) as u64);
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    )
}

/// The canonical request and its signed-header list. `headers` are the ones signed;
/// `path` is the path and query as they go upstream. S3 encodes the path once and keeps
/// it as it is; every other service normalizes it and encodes it again.
fn canonical_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    payload_hash: &str,
    s3: bool,
) -> (String, String) {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let uri = if s3 {
        let decoded: Vec<u8> = percent_decode_str(path).collect();
        percent_encode(&decoded, UNRESERVED_AND_SLASH).to_string()
    } else {
        percent_encode(remove_dot_segments(path).as_bytes(), UNRESERVED_AND_SLASH).to_string()
    };

    let mut canonical_headers: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        match canonical_headers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            None => canonical_headers.push((name, value)),
        }
    }
    canonical_headers.sort();
    let signed_headers = canonical_headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let header_block: String = canonical_headers
        .iter()
        .map(|(n, v)| format!("{n}:{v}\n"))
        .collect();

    let canonical = format!(
        "{method}\n{uri}\n{}\n{header_block}\n{signed_headers}\n{payload_hash}",
        canonical_query(query)
    );
    (canonical, signed_headers)
}

/// Each name and value decoded then encoded as AWS does, sorted by name, then value.
fn canonical_query(query: &str) -> String {
    let encode = |s: &str| {
        let decoded: Vec<u8> = percent_decode_str(s).collect();
        percent_encode(&decoded, UNRESERVED).to_string()
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(k), encode(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 3986 dot-segment removal, plus what AWS adds: empty segments go too.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = path.ends_with('/') && !out.is_empty();
    let mut normalized = String::with_capacity(path.len());
    normalized.push('/');
    normalized.push_str(&out.join("/"));
    if trailing {
        normalized.push('/');
    }
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of AWS's published suite: the canonical request and the Authorization
    /// header, byte for byte.
    #[test]
    fn the_aws_test_suite() {
        let suite = include_str!("../../../tests/data/aws-sigv4-suite.txt");
        let mut cases = 0;
        for case in suite.split("=== ").skip(1) {
            let (name, rest) = case.split_once('\n').unwrap();
            let (req, rest) = rest
                .strip_prefix("--- req\n")
                .unwrap()
                .split_once("\n--- creq\n")
                .unwrap();
            let (creq, authz) = rest.split_once("\n--- authz\n").unwrap();
            let (head, body) = req.split_once("\n\n").unwrap_or((req, ""));
            let mut lines = head.lines();
            let request_line = lines.next().unwrap();
            let (method, rest) = request_line.split_once(' ').unwrap();
            let path = rest.rsplit_once(' ').unwrap().0;
            let headers: Vec<(&str, &str)> = lines.map(|l| l.split_once(':').unwrap()).collect();
            let payload = hex(&Sha256::digest(body.as_bytes()));
            let (canonical, signed) = canonical_request(method, path, &headers, &payload, false);
            assert_eq!(canonical, creq, "{name}: canonical request");

            let scope = "20150830/us-east-1/service/aws4_request";
            let key = signing_key(
                b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                "20150830",
                "us-east-1",
                "service",
            );
            let to_sign = string_to_sign("20150830T123600Z", scope, &canonical);
            let signature = hex(&hmac(&key, to_sign.as_bytes()));
            let header = format!(
                "{ALGORITHM} Credential=AKIDEXAMPLE/{scope}, SignedHeaders={signed}, Signature={signature}"
            );
            assert_eq!(header, authz.trim_end(), "{name}: authorization");
            cases += 1;
        }
        assert_eq!(cases, 20);
    }

    /// The signer as the request path uses it: its headers, its day-key cache.
    #[test]
    fn the_signer_signs_host_date_payload_and_token() {
        let signer = Signer::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("session-token"),
            "us-east-1",
            "service",
            false,
        );
        let request = Request {
            method: "POST",
            authority: "example.amazonaws.com",
            path: "/",
            body: Some(b""),
            headers: &[],
        };
        let headers = signer.sign(&request, 1_440_938_160);
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .unwrap()
        };
        assert_eq!(get("x-amz-date"), "20150830T123600Z");
        assert_eq!(get("x-amz-security-token"), "session-token");
        assert_eq!(
            get("x-amz-content-sha256"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let authorization = get("authorization");
        assert!(authorization.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature="
        ), "{authorization}");
        // The cached day key gives the same signature; the next day, another.
        assert_eq!(signer.sign(&request, 1_440_938_160), headers);
        assert_ne!(signer.sign(&request, 1_440_938_160 + 86_400), headers);
        assert!(!format!("{signer:?}").contains("EXAMPLEKEY"));
    }

    #[test]
    fn dates_and_paths() {
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(remove_dot_segments("/"), "/");
        assert_eq!(remove_dot_segments(""), "/");
        assert_eq!(remove_dot_segments("//example//"), "/example/");
        assert_eq!(remove_dot_segments("/example1/example2/../.."), "/");
        assert_eq!(remove_dot_segments("/./example"), "/example");
    }
}
