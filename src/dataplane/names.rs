//! Names that mark a secret wherever a request carries them: the headers a proxy key
//! travels in (stripped before forwarding) and names that read like a credential (never
//! kept by the audit). A leaf, so that authentication, rules, mutation and the audit can
//! all share one list without importing each other.

/// Headers that can carry a proxy key; every one of them is stripped before forwarding.
/// `api-key` is Azure OpenAI's, `x-goog-api-key` Gemini's: their SDKs keep working.
pub const CARRIERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "x-latchkey-key",
    "api-key",
    "x-goog-api-key",
];

/// Words that make a name look like a secret's, in any case, anywhere in it.
const SECRET_WORDS: [&str; 12] = [
    "auth",
    "key",
    "token",
    "secret",
    "cookie",
    "pass",
    "pwd",
    "session",
    "sig",
    "credential",
    "bearer",
    "jwt",
];

/// Whether `name` (a header, a query parameter, a step of a JSON pointer) is a key
/// carrier or holds a secret word. Run when rules compile, not per request.
pub fn secret_like(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    CARRIERS.contains(&lower.as_str()) || SECRET_WORDS.iter().any(|w| lower.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_like_secrets_are_found_in_any_case_and_at_any_length() {
        let long = format!("x-{}-Session", "a".repeat(70));
        for name in [
            "Authorization",
            "X-API-KEY",
            "x-my-Token-id",
            "PWD",
            &long,
            "signature",
        ] {
            assert!(secret_like(name), "{name}");
        }
        let long = format!("x-{}", "b".repeat(70));
        for name in ["x-team", "X-Env", "", "a", &long, "ke", "x-api-ke"] {
            assert!(!secret_like(name), "{name}");
        }
    }
}
