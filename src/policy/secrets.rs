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
            self.mounted.is_some(),
            self.aws_secrets_manager.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 || self.sealed == Some(false) {
            return Err(
                "give exactly one of `env`, `file`, `value`, `sealed: true`, `mounted` or `aws_secrets_manager`"
                    .into(),
            );
        }
        if let Some(path) = &self.mounted
            && (!path.starts_with('/') || path.contains('\0'))
        {
            return Err(format!(
                "mounted: {path:?} is not an absolute path (the server reads it)"
            ));
        }
        if let Some(aws) = &self.aws_secrets_manager {
            aws.validate()
                .map_err(|e| format!("aws_secrets_manager: {e}"))?;
        }
        Ok(())
    }

    /// Where the server reads this secret itself, if it does.
    pub fn server_source(&self) -> Option<ServerSource> {
        if let Some(path) = &self.mounted {
            return Some(ServerSource::Mounted(path.clone()));
        }
        self.aws_secrets_manager.clone().map(ServerSource::Aws)
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
        if let Some(source) = self.server_source() {
            return Err(format!("{source} is read by the server, not here"));
        }
        Ok(self.value.clone().unwrap_or_default())
    }
}

/// A secret the server reads itself, and keeps reading: a mounted file, or a secret in
/// AWS Secrets Manager.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ServerSource {
    Mounted(String),
    Aws(AwsSecretRef),
}

impl std::fmt::Display for ServerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerSource::Mounted(path) => write!(f, "mounted file {path}"),
            ServerSource::Aws(aws) => write!(f, "AWS secret {}", aws.id),
        }
    }
}

/// The shortest and the default time between two fetches of an AWS secret.
pub const AWS_MIN_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);
pub const AWS_DEFAULT_REFRESH: std::time::Duration = std::time::Duration::from_secs(300);

impl AwsSecretRef {
    fn validate(&self) -> Result<(), String> {
        let printable =
            |s: &str| !s.is_empty() && s.len() <= 2048 && !s.chars().any(char::is_control);
        if !printable(&self.id) {
            return Err("`id` must be a secret's name or ARN".into());
        }
        if let Some(region) = &self.region
            && (region.is_empty()
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(format!("region: {region:?} is not an AWS region"));
        }
        if let Some(field) = &self.field
            && !printable(field)
        {
            return Err("`field` must name a member of the secret's JSON".into());
        }
        self.refresh_every().map(|_| ())
    }

    /// How often the server fetches the secret again.
    pub fn refresh_every(&self) -> Result<std::time::Duration, String> {
        let Some(text) = &self.refresh else {
            return Ok(AWS_DEFAULT_REFRESH);
        };
        let every =
            humantime::parse_duration(text).map_err(|e| format!("refresh: {text:?}: {e}"))?;
        if every < AWS_MIN_REFRESH {
            return Err(format!("refresh: {text:?} is under 1s"));
        }
        Ok(every)
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
