//! One policy item at a time: a target, credential, proxy or rule created, read, replaced
//! or deleted by editing the live policy file and applying it whole, so every item is
//! checked exactly as `apply` checks a file.

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::policy::{
    CredentialSpec, CredentialType, PolicyFile, ProxySpec, RuleSpec, SecretRef, ServerSource,
    TargetSpec,
};
use crate::store::Desired;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Target,
    Credential,
    Proxy,
    Rule,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Target => "target",
            Kind::Credential => "credential",
            Kind::Proxy => "proxy",
            Kind::Rule => "rule",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists; update it instead")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{0}")]
    Invalid(String),
}

pub enum Edit<'a> {
    /// The item's policy-file text (YAML or JSON).
    Create(&'a str),
    Update(&'a str),
    Delete(&'a str),
}

/// Every item of a kind as `(name, JSON)`, by name.
pub fn list(file: &PolicyFile, kind: Kind) -> Vec<(String, serde_json::Value)> {
    fn all<T: Serialize>(
        items: &[T],
        name: impl Fn(&T) -> String,
    ) -> Vec<(String, serde_json::Value)> {
        let mut out: Vec<_> = items
            .iter()
            .map(|i| {
                (
                    name(i),
                    serde_json::to_value(i).expect("an item serializes"),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
    match kind {
        Kind::Target => all(&file.targets, |t| t.name.clone()),
        Kind::Credential => all(&file.credentials, |c| c.name.clone()),
        Kind::Proxy => all(&file.proxies, |p| p.name.clone()),
        Kind::Rule => all(&file.rules, RuleSpec::id),
    }
}

/// The secrets an item's text has the server read: what it reads before the edit.
/// Text that does not parse names none (the edit itself reports it).
pub fn server_sources(kind: Kind, spec: &str) -> Vec<ServerSource> {
    match kind {
        Kind::Credential => serde_norway::from_str::<CredentialSpec>(spec)
            .ok()
            .and_then(|c| c.secret?.server_source())
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// Applies one edit to the file; returns the item's name. The file is validated as a
/// whole by whoever applies it.
pub fn edit(file: &mut PolicyFile, kind: Kind, edit: Edit<'_>) -> Result<String, ItemError> {
    match kind {
        Kind::Target => edit_in(&mut file.targets, kind, edit, |t: &TargetSpec| {
            t.name.clone()
        }),
        Kind::Credential => edit_in(&mut file.credentials, kind, edit, |c: &CredentialSpec| {
            c.name.clone()
        }),
        Kind::Proxy => edit_in(&mut file.proxies, kind, edit, |p: &ProxySpec| {
            p.name.clone()
        }),
        Kind::Rule => edit_in(&mut file.rules, kind, edit, |r: &RuleSpec| r.id()),
    }
}

fn edit_in<T: DeserializeOwned>(
    items: &mut Vec<T>,
    kind: Kind,
    edit: Edit<'_>,
    name: impl Fn(&T) -> String,
) -> Result<String, ItemError> {
    let parse = |text: &str| {
        serde_norway::from_str::<T>(text)
            .map_err(|e| ItemError::Invalid(format!("{}: {e}", kind.as_str())))
    };
    let position = |items: &[T], wanted: &str| items.iter().position(|i| name(i) == wanted);
    let not_found = |name: String| ItemError::NotFound {
        kind: kind.as_str(),
        name,
    };
    match edit {
        Edit::Create(text) => {
            let item = parse(text)?;
            let item_name = name(&item);
            if position(items, &item_name).is_some() {
                return Err(ItemError::AlreadyExists {
                    kind: kind.as_str(),
                    name: item_name,
                });
            }
            items.push(item);
            Ok(item_name)
        }
        Edit::Update(text) => {
            let item = parse(text)?;
            let item_name = name(&item);
            let at = position(items, &item_name).ok_or_else(|| not_found(item_name.clone()))?;
            items[at] = item;
            Ok(item_name)
        }
        Edit::Delete(item_name) => {
            let at = position(items, item_name).ok_or_else(|| not_found(item_name.to_owned()))?;
            items.remove(at);
            Ok(item_name.to_owned())
        }
    }
}

/// The file to apply, with every target secret the client did not send kept as held:
/// only the edited credential's material travels (a secret the server reads stays so). The references shown (`env`, `file`)
/// stay what they were.
pub fn desired(
    mut file: PolicyFile,
    secrets: HashMap<String, Zeroizing<String>>,
    keys: HashMap<String, Vec<[u8; 32]>>,
) -> Result<Desired, String> {
    let mut references = HashMap::new();
    for c in &mut file.credentials {
        let server_read = c
            .secret
            .as_ref()
            .is_some_and(|s| s.server_source().is_some());
        if c.kind != CredentialType::Target || server_read || secrets.contains_key(&c.name) {
            continue;
        }
        references.insert(c.name.clone(), c.stored_references());
        c.secret = Some(SecretRef::sealed());
        if let Some(token) = &mut c.session_token {
            *token = SecretRef::sealed();
        }
    }
    let mut desired = Desired::new(&file, secrets, keys)?;
    for c in &mut desired.credentials {
        if let Some((secret, token)) = references.remove(&c.name) {
            c.secret_ref = secret;
            if let Some(auth) = &mut c.auth {
                auth.session_token = token;
            }
        }
    }
    Ok(desired)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
targets:
  - { name: a, url: "https://a.example" }
  - { name: b, url: "https://b.example" }
rules:
  - { id: r1, proxy: p, effect: allow }
"#;

    #[test]
    fn create_update_delete_by_name_or_id() {
        let mut file = serde_norway::from_str::<PolicyFile>(FILE).unwrap();
        let name = edit(
            &mut file,
            Kind::Target,
            Edit::Create("{ name: c, url: \"https://c.example\" }"),
        )
        .unwrap();
        assert_eq!(name, "c");
        let err = edit(
            &mut file,
            Kind::Target,
            Edit::Create("{ name: a, url: \"https://x\" }"),
        )
        .unwrap_err();
        assert!(matches!(err, ItemError::AlreadyExists { .. }), "{err}");
        edit(
            &mut file,
            Kind::Target,
            Edit::Update("{ name: a, url: \"https://a2.example\" }"),
        )
        .unwrap();
        assert_eq!(file.targets[0].url, "https://a2.example");
        let err = edit(&mut file, Kind::Target, Edit::Delete("zz")).unwrap_err();
        assert_eq!(err.to_string(), "target \"zz\" does not exist");
        edit(
            &mut file,
            Kind::Rule,
            Edit::Update("{ id: r1, proxy: p, effect: deny }"),
        )
        .unwrap();
        assert_eq!(file.rules[0].effect.as_str(), "deny");
        edit(&mut file, Kind::Rule, Edit::Delete("r1")).unwrap();
        assert!(file.rules.is_empty());
        let err = edit(&mut file, Kind::Target, Edit::Create("{ name: d, uri: x }")).unwrap_err();
        assert!(err.to_string().contains("uri"), "{err}");
        let names: Vec<String> = list(&file, Kind::Target)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
