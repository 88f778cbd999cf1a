//! Validation of a policy file: everything `apply` and `check` refuse before anything
//! is applied, each error naming the item at fault.

use std::collections::{HashMap, HashSet};

use crate::policy::file::*;
use crate::policy::{ServerSource, TargetUrl};

impl PolicyFile {
    /// Parses and validates a policy file; the error names the line or the item at fault.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = if text.trim().is_empty() {
            PolicyFile::default()
        } else {
            serde_norway::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?
        };
        file.validate()?;
        Ok(file)
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut targets = HashSet::new();
        for t in &self.targets {
            let item = format!("target {:?}", t.name);
            if !valid_name(&t.name) {
                return Err(invalid(item, "name must be 1-128 of [A-Za-z0-9._-]"));
            }
            if !targets.insert(t.name.as_str()) {
                return Err(invalid(item, "defined twice"));
            }
            TargetUrl::parse(&t.url).map_err(|p| invalid(&item, format!("url: {p}")))?;
        }

        let mut credentials = HashMap::new();
        for c in &self.credentials {
            let item = format!("credential {:?}", c.name);
            if !valid_name(&c.name) {
                return Err(invalid(item, "name must be 1-128 of [A-Za-z0-9._-]"));
            }
            if credentials.insert(c.name.as_str(), c.kind).is_some() {
                return Err(invalid(item, "defined twice"));
            }
            c.validate().map_err(|p| invalid(item, p))?;
        }

        let mut proxies = HashSet::new();
        for p in &self.proxies {
            let item = format!("proxy {:?}", p.name);
            if !valid_name(&p.name) {
                return Err(invalid(item, "name must be 1-128 of [A-Za-z0-9._-]"));
            }
            if !proxies.insert(p.name.as_str()) {
                return Err(invalid(item, "defined twice"));
            }
            if p.name.eq_ignore_ascii_case("latchkey") {
                return Err(invalid(
                    item,
                    "`latchkey` is reserved for latchkey's own endpoints (/latchkey/v1/run-keys)",
                ));
            }
            if p.default_effect == Effect::Approve {
                return Err(invalid(
                    item,
                    "default_effect is allow or deny; `approve` goes on a rule",
                ));
            }
            if !targets.contains(p.target.as_str()) {
                return Err(invalid(
                    item,
                    format!("target {:?} is not defined", p.target),
                ));
            }
            match credentials.get(p.target_credential.as_str()) {
                Some(CredentialType::Target) => {}
                Some(CredentialType::Proxy) => {
                    return Err(invalid(
                        item,
                        format!(
                            "target_credential {:?} is a proxy credential, not a target one",
                            p.target_credential
                        ),
                    ));
                }
                None => {
                    return Err(invalid(
                        item,
                        format!("target_credential {:?} is not defined", p.target_credential),
                    ));
                }
            }
            let mut bound = HashSet::new();
            for name in &p.proxy_credentials {
                match credentials.get(name.as_str()) {
                    Some(CredentialType::Proxy) => {}
                    Some(CredentialType::Target) => {
                        return Err(invalid(
                            item,
                            format!("proxy_credentials: {name:?} is a target credential"),
                        ));
                    }
                    None => {
                        return Err(invalid(
                            item,
                            format!("proxy_credentials: {name:?} is not defined"),
                        ));
                    }
                }
                if !bound.insert(name) {
                    return Err(invalid(item, format!("proxy_credentials: {name:?} twice")));
                }
            }
            if let Some(cost) = &p.cost {
                cost.validate()
                    .map_err(|e| invalid(&item, format!("cost: {e}")))?;
            }
            if let Some(response) = &p.response {
                response
                    .validate()
                    .map_err(|e| invalid(&item, format!("response: {e}")))?;
            }
            if let Some(guards) = &p.guards {
                guards
                    .duplicate_window()
                    .map_err(|e| invalid(&item, format!("guards: {e}")))?;
                if let Some(r) = &guards.retries {
                    if !(1..=5).contains(&r.max) {
                        return Err(invalid(item, "guards: retries: max is 1 to 5"));
                    }
                    if let Some(s) = r
                        .statuses
                        .iter()
                        .find(|s| ![429, 502, 503, 504].contains(*s))
                    {
                        return Err(invalid(
                            item,
                            format!("guards: retries: status {s} is not one of 429, 502, 503, 504"),
                        ));
                    }
                    if r.statuses.is_empty() && !r.connection_failures {
                        return Err(invalid(item, "guards: retries: retry on what?"));
                    }
                }
                if let Some(alerts) = &guards.alerts {
                    alerts
                        .spans()
                        .map_err(|e| invalid(&item, format!("guards: alerts: {e}")))?;
                }
                for hook in &guards.webhooks {
                    hook.validate()
                        .map_err(|e| invalid(&item, format!("guards: webhooks: {e}")))?;
                }
            }
            match (&p.mcp, p.protocol) {
                (Some(mcp), crate::policy::Protocol::Mcp) => {
                    mcp.validate().map_err(|e| invalid(&item, e))?;
                }
                (Some(_), crate::policy::Protocol::Http) => {
                    return Err(invalid(item, "`mcp` needs `protocol: mcp`"));
                }
                (None, _) => {}
            }
            if let Some(limits) = &p.limits {
                limits.validate().map_err(|e| invalid(&item, e))?;
                if limits
                    .upstream_timeout_s
                    .is_some_and(|t| !(1..=3600).contains(&t))
                {
                    return Err(invalid(item, "limits: upstream_timeout_s is 1 to 3600"));
                }
                if !limits.spend_caps().is_empty() || !limits.token_budgets().is_empty() {
                    return Err(invalid(
                        item,
                        "limits: spend_usd_per_* and tokens_per_* go on proxy credentials",
                    ));
                }
            }
        }

        let mcp_proxies: HashSet<&str> = (self.proxies.iter())
            .filter(|p| p.protocol == crate::policy::Protocol::Mcp)
            .map(|p| p.name.as_str())
            .collect();
        let mut rule_ids = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let item = format!("rules[{i}]");
            let id = r.id();
            if !rule_ids.insert(id.clone()) {
                return Err(invalid(item, format!("rule id {id:?} used twice")));
            }
            match (&r.credential, &r.proxy) {
                (Some(c), None) => match credentials.get(c.as_str()) {
                    Some(CredentialType::Proxy) => {}
                    Some(CredentialType::Target) => {
                        return Err(invalid(
                            item,
                            format!(
                                "credential {c:?} is a target credential; rules attach to proxy credentials"
                            ),
                        ));
                    }
                    None => {
                        return Err(invalid(item, format!("credential {c:?} is not defined")));
                    }
                },
                (None, Some(p)) => {
                    if !proxies.contains(p.as_str()) {
                        return Err(invalid(item, format!("proxy {p:?} is not defined")));
                    }
                }
                _ => {
                    return Err(invalid(
                        item,
                        "a rule names exactly one of `credential` or `proxy`",
                    ));
                }
            }
            for m in r.methods.iter().flatten() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(invalid(
                        item,
                        format!("methods: {m:?} is not an HTTP method"),
                    ));
                }
            }
            if let Some(path) = &r.path {
                compile_regex(path).map_err(|e| invalid(&item, format!("path: {e}")))?;
            }
            for (name, condition) in &r.headers {
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(invalid(
                        item,
                        format!("headers: {name:?} is not a header name"),
                    ));
                }
                condition
                    .validate()
                    .map_err(|e| invalid(&item, format!("headers: {name}: {e}")))?;
            }
            for (name, condition) in &r.query {
                condition
                    .validate()
                    .map_err(|e| invalid(&item, format!("query: {name}: {e}")))?;
            }
            for (i, condition) in r.body.iter().enumerate() {
                condition
                    .validate()
                    .map_err(|e| invalid(&item, format!("body[{i}]: {e}")))?;
            }
            if let Some(mcp) = &r.mcp {
                mcp.validate().map_err(|e| invalid(&item, e))?;
                if let Some(p) = &r.proxy
                    && !mcp_proxies.contains(p.as_str())
                {
                    return Err(invalid(
                        item,
                        format!("mcp: proxy {p:?} is not `protocol: mcp`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Target credentials whose secret the client resolves: neither `sealed: true` nor
    /// read by the server.
    pub fn target_secrets(&self) -> impl Iterator<Item = &CredentialSpec> {
        self.credentials.iter().filter(|c| {
            c.secret
                .as_ref()
                .is_some_and(|s| !s.is_sealed() && s.server_source().is_none())
        })
    }

    /// The secrets the server reads itself, for it to read before it takes the file.
    pub fn server_sources(&self) -> Vec<ServerSource> {
        self.credentials
            .iter()
            .filter_map(|c| c.secret.as_ref()?.server_source())
            .collect()
    }

    /// Every imported proxy key reference, by credential name.
    pub fn imported_keys(&self) -> impl Iterator<Item = (&str, &[SecretRef])> {
        self.credentials
            .iter()
            .filter_map(|c| Some((c.name.as_str(), c.keys.as_deref()?)))
            .filter(|(_, keys)| !keys.iter().any(SecretRef::is_sealed))
    }
}

impl CredentialSpec {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let present = |set: bool, field: &str, needed: bool| match (set, needed) {
            (true, false) => Err(format!("`{field}` does not apply here")),
            (false, true) => Err(format!("`{field}` is required")),
            _ => Ok(()),
        };
        match self.kind {
            CredentialType::Proxy => {
                for (set, field) in [
                    (self.auth.is_some(), "auth"),
                    (self.secret.is_some(), "secret"),
                    (self.header.is_some(), "header"),
                    (self.prefix.is_some(), "prefix"),
                    (self.username.is_some(), "username"),
                    (self.param.is_some(), "param"),
                    (self.token_url.is_some(), "token_url"),
                    (self.client_id.is_some(), "client_id"),
                    (self.scopes.is_some(), "scopes"),
                    (self.client_auth.is_some(), "client_auth"),
                    (self.token_params.is_some(), "token_params"),
                    (self.access_key_id.is_some(), "access_key_id"),
                    (self.region.is_some(), "region"),
                    (self.service.is_some(), "service"),
                    (self.session_token.is_some(), "session_token"),
                    (self.unsigned_payload.is_some(), "unsigned_payload"),
                ] {
                    present(
                        set,
                        &format!("{field}` (proxy credentials take only `keys"),
                        false,
                    )?;
                }
                for k in self.keys.iter().flatten() {
                    k.validate().map_err(|e| format!("keys: {e}"))?;
                    if k.server_source().is_some() {
                        return Err(
                            "keys: a proxy key is given by `env`, `file` or `value` (the server keeps only its hash)"
                                .into(),
                        );
                    }
                }
                let keys = self.keys.as_deref().unwrap_or_default();
                if keys.iter().any(SecretRef::is_sealed) && keys.len() != 1 {
                    return Err(
                        "keys: `[{ sealed: true }]` keeps the imported keys latchkey holds; it stands alone"
                            .into(),
                    );
                }
                if let Some(identity) = &self.identity {
                    identity.validate()?;
                }
                match &self.limits {
                    Some(l) if l.upstream_timeout_s.is_some() => {
                        Err("limits: upstream_timeout_s goes on proxies".into())
                    }
                    Some(l) => l.validate(),
                    None => Ok(()),
                }
            }
            CredentialType::Target => {
                let auth = self
                    .auth
                    .ok_or("`auth` is required for a target credential")?;
                present(self.keys.is_some(), "keys", false)?;
                present(self.identity.is_some(), "identity", false)?;
                self.secret
                    .as_ref()
                    .ok_or("`secret` is required")?
                    .validate()
                    .map_err(|e| format!("secret: {e}"))?;
                let is = |k: AuthKind| auth == k;
                present(self.header.is_some(), "header", is(AuthKind::Header))?;
                present(
                    self.prefix.is_some() && !is(AuthKind::Header),
                    "prefix",
                    false,
                )?;
                present(self.username.is_some(), "username", is(AuthKind::Basic))?;
                present(self.param.is_some(), "param", is(AuthKind::Query))?;
                let oauth = is(AuthKind::Oauth2ClientCredentials);
                present(self.token_url.is_some(), "token_url", oauth)?;
                present(self.client_id.is_some(), "client_id", oauth)?;
                present(self.scopes.is_some() && !oauth, "scopes", false)?;
                present(self.client_auth.is_some() && !oauth, "client_auth", false)?;
                present(self.token_params.is_some() && !oauth, "token_params", false)?;
                let aws = is(AuthKind::AwsSigv4);
                present(self.access_key_id.is_some(), "access_key_id", aws)?;
                present(self.region.is_some(), "region", aws)?;
                present(self.service.is_some(), "service", aws)?;
                present(self.session_token.is_some() && !aws, "session_token", false)?;
                present(
                    self.unsigned_payload.is_some() && !aws,
                    "unsigned_payload",
                    false,
                )?;
                self.validate_aws()?;
                if let Some(url) = &self.token_url
                    && !(url.starts_with("https://") || url.starts_with("http://"))
                {
                    return Err(format!("token_url: {url:?} is not an http(s) URL"));
                }
                for (k, _) in self.token_params.iter().flatten() {
                    if matches!(
                        k.as_str(),
                        "grant_type" | "scope" | "client_id" | "client_secret"
                    ) {
                        return Err(format!(
                            "token_params: {k:?} is set by latchkey, not by the policy"
                        ));
                    }
                }
                if let Some(h) = &self.header
                    && (h.is_empty()
                        || h.starts_with(':')
                        || !h
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
                {
                    return Err(format!("header: {h:?} is not a valid header name"));
                }
                if let Some(p) = &self.param
                    && p.is_empty()
                {
                    return Err("param: must not be empty".into());
                }
                if let Some(u) = &self.username
                    && u.contains(':')
                {
                    return Err("username: must not contain ':'".into());
                }
                Ok(())
            }
        }
    }
}

impl CredentialSpec {
    pub(crate) fn validate_aws(&self) -> Result<(), String> {
        let word = |field: &str, value: &Option<String>, extra: &[u8]| match value {
            Some(v)
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b)) =>
            {
                Err(format!("{field}: {v:?} is not a valid AWS {field}"))
            }
            _ => Ok(()),
        };
        word("access_key_id", &self.access_key_id, b"")?;
        word("region", &self.region, b"-")?;
        word("service", &self.service, b"-")?;
        if let Some(token) = &self.session_token {
            token
                .validate()
                .map_err(|e| format!("session_token: {e}"))?;
            let server_read =
                |s: &Option<SecretRef>| s.as_ref().is_some_and(|s| s.server_source().is_some());
            if server_read(&self.session_token) || server_read(&self.secret) {
                return Err(
                    "session_token: temporary AWS credentials are given by the client (`env`, `file` or `value`); a secret the server reads is a long-lived access key"
                        .into(),
                );
            }
            let secret_sealed = self.secret.as_ref().is_some_and(SecretRef::is_sealed);
            if token.is_sealed() != secret_sealed {
                return Err(
                    "session_token: `sealed: true` keeps the secret and the token latchkey holds, so give both sealed or neither"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The secret material the server seals for a target credential, resolved by the
    /// client: the secret, then for AWS temporary credentials a line break and the
    /// session token (neither can hold a line break).
    pub fn resolve_secret(&self, base: &std::path::Path) -> Result<String, String> {
        let secret = self
            .secret
            .as_ref()
            .ok_or("no secret")?
            .resolve(base)
            .map_err(|e| format!("secret: {e}"))?;
        if self.auth != Some(AuthKind::AwsSigv4) {
            return Ok(secret);
        }
        let token = match &self.session_token {
            Some(token) => Some(
                token
                    .resolve(base)
                    .map_err(|e| format!("session_token: {e}"))?,
            ),
            None => None,
        };
        crate::policy::secrets::check_aws_secrets(&secret, token.as_deref())?;
        Ok(match token {
            Some(token) => format!("{secret}\n{token}"),
            None => secret,
        })
    }

    /// The references stored for a secret and its session token: where each came from,
    /// and if either is held sealed, both (the two travel and are kept as one).
    pub fn stored_references(&self) -> (Option<SecretRef>, Option<SecretRef>) {
        let secret = self.secret.as_ref().map(SecretRef::stored_form);
        let token = self.session_token.as_ref().map(SecretRef::stored_form);
        let sealed = secret.iter().chain(&token).any(SecretRef::is_sealed);
        if sealed && token.is_some() {
            (Some(SecretRef::sealed()), Some(SecretRef::sealed()))
        } else {
            (secret, token)
        }
    }
}

impl Limits {
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("requests_per_minute", self.requests_per_minute),
            ("requests_per_day", self.requests_per_day),
        ] {
            if value == Some(0) {
                return Err(format!("limits: {name} must be at least 1"));
            }
        }
        if self.tokens_per_minute == Some(0) || self.tokens_per_day == Some(0) {
            return Err("limits: a token budget is at least 1".into());
        }
        match self
            .spend_caps()
            .into_iter()
            .find(|(_, usd)| !(usd.is_finite() && *usd >= 0.0))
        {
            Some((period, _)) => Err(format!(
                "limits: spend_usd_per_{} must be a non-negative amount",
                period.name()
            )),
            None => Ok(()),
        }
    }
}

impl Guards {
    /// The duplicate window, if one is set: 1 s to 24 h.
    pub fn duplicate_window(&self) -> Result<Option<std::time::Duration>, String> {
        let Some(text) = &self.duplicate_window else {
            return Ok(None);
        };
        let window = humantime::parse_duration(text)
            .map_err(|e| format!("duplicate_window: {text:?}: {e}"))?;
        if !(1..=86_400).contains(&window.as_secs()) || window.subsec_nanos() != 0 {
            return Err(format!(
                "duplicate_window: {text:?} is not whole seconds from 1s to 24h"
            ));
        }
        Ok(Some(window))
    }
}

/// The most fields one proxy redacts: each is looked for in every response.
const MAX_REDACTED_FIELDS: usize = 64;

impl ResponseSafety {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.scrub_credential && self.redact.is_empty() {
            return Err("set `scrub_credential: true` or list fields to `redact`".into());
        }
        if self.redact.len() > MAX_REDACTED_FIELDS {
            return Err(format!(
                "redact: at most {MAX_REDACTED_FIELDS} fields, not {}",
                self.redact.len()
            ));
        }
        let mut seen = HashSet::new();
        for field in &self.redact {
            if field.is_empty() || field == "/" {
                return Err("redact: an empty field name or pointer redacts nothing".into());
            }
            if !seen.insert(field) {
                return Err(format!("redact: {field:?} twice"));
            }
        }
        Ok(())
    }
}

impl Cost {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let amount = |f: f64| f.is_finite() && f >= 0.0;
        if let Some(max) = self.max_usd_per_request
            && !(max.is_finite() && max > 0.0)
        {
            return Err("max_usd_per_request: a positive amount".into());
        }
        match (
            &self.response_json,
            self.usd_per_unit,
            self.per_request_usd,
            self.tokens,
        ) {
            (Some(ptr), Some(f), None, None) if amount(f) => {
                if !ptr.is_empty() && !ptr.starts_with('/') {
                    return Err(format!("response_json: {ptr:?} is not a JSON pointer"));
                }
                Ok(())
            }
            (None, None, Some(f), None) if amount(f) => match self.max_usd_per_request {
                Some(_) => Err("`max_usd_per_request` goes with `response_json` or `tokens`".into()),
                None => Ok(()),
            },
            (None, None, None, Some(_)) => {
                let prices = self
                    .usd_per_million
                    .as_ref()
                    .filter(|p| !p.is_empty())
                    .ok_or("`tokens` needs `usd_per_million`: a price per model, or \"*\"")?;
                for (model, p) in prices {
                    if !(amount(p.input) && amount(p.output) && p.cached_input.is_none_or(amount))
                    {
                        return Err(format!(
                            "usd_per_million {model:?}: prices are non-negative amounts"
                        ));
                    }
                }
                Ok(())
            }
            _ => Err(
                "give `response_json` with `usd_per_unit`, `per_request_usd`, or `tokens` with `usd_per_million` (non-negative)"
                    .into(),
            ),
        }
        .and_then(|()| match (&self.usd_per_million, self.tokens) {
            (Some(_), None) => Err("`usd_per_million` goes with `tokens`".into()),
            _ => Ok(()),
        })
    }
}

impl RuleSpec {
    /// The rule's id: given, or derived from its content so it is stable across applies.
    pub fn id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        let canonical = serde_json::to_vec(self).expect("a rule serializes");
        format!(
            "rule_{}",
            &crate::base::crypto::hex(&crate::base::crypto::hash_key(&canonical))[..12]
        )
    }
}

#[cfg(test)]
mod tests;
