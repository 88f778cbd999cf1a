//! Secret references: where a credential's material comes from, and what of a
//! reference may be stored and shown.

use crate::policy::file::*;

impl SecretRef {
    /// What may be stored and shown of the reference: where a secret came from, never
    /// the secret itself (an inline `value` becomes a marker).
    pub fn stored_form(&self) -> Self {
        if self.value.is_some() {
            Self::sealed()
        } else {
            self.clone()
        }
    }

    pub fn sealed() -> Self {
        Self {
            sealed: Some(true),
            ..Self::default()
        }
    }

    /// Keeps the secret latchkey holds rather than giving one.
    pub fn is_sealed(&self) -> bool {
        self.sealed == Some(true)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let given = [
            self.env.is_some(),
            self.file.is_some(),
            self.value.is_some(),
            self.is_sealed(),
        ];
        if given.iter().filter(|g| **g).count() != 1 || self.sealed == Some(false) {
            return Err("give exactly one of `env`, `file`, `value` or `sealed: true`".into());
        }
        Ok(())
    }

    /// Reads the secret where the reference points: the caller's environment, or a file
    /// (a relative path is taken from `base`, the policy file's folder).
    pub fn resolve(&self, base: &std::path::Path) -> Result<String, String> {
        if let Some(var) = &self.env {
            return std::env::var(var)
                .map_err(|_| format!("environment variable {var} is not set"));
        }
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(base.join(path))
                .map_err(|e| format!("file {path}: {e}"))?;
            return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        Ok(self.value.clone().unwrap_or_default())
    }
}

/// Checks an AWS secret access key and session token before they are used: they travel
/// and are stored as one text, "secret\ntoken", so neither may be empty or hold a line
/// break.
pub fn check_aws_secrets(secret: &str, token: Option<&str>) -> Result<(), &'static str> {
    if std::iter::once(secret)
        .chain(token)
        .any(|s| s.is_empty() || s.contains(['\n', '\r']))
    {
        return Err("an AWS secret or session token is empty or holds a line break");
    }
    Ok(())
}
