//! Which proxies Envoy's in-process module decides by itself, and which it hands on to
//! ext_proc: the module judges headers from the snapshot and counts requests in the
//! Envoy process, so anything that waits on I/O or a body goes to `latchkey serve`.
//!
//! Counters must each live in one place, or a limit would be counted twice over (once
//! in Envoy, once in `serve`). So the split is by connected part of the binding graph:
//! a proxy goes in-process only if it and every credential bound to it, and every other
//! proxy those credentials use, can.

use std::collections::HashSet;
use std::sync::Arc;

use crate::dataplane::snapshot::{Injection, Policy, Proxy};

impl Policy {
    /// The proxies the in-process module decides; every other one is handed on.
    /// `shared_budgets`: limits are counted in a store all replicas share (Redis), which
    /// only `serve` reaches, so a proxy with any limit is handed on.
    pub fn in_process(&self, shared_budgets: bool) -> foldhash::HashSet<Arc<str>> {
        let compiled = &self.compiled;
        let credential_alone = |c: u32| {
            let i = c as usize;
            !compiled.credential_rules[i].any_approves()
                && !compiled.trusts.iter().any(|t| t.credential == c)
                && (!shared_budgets || compiled.credential_limits[i].is_empty())
        };
        let mut handed: HashSet<u32> = (0..compiled.credentials.len() as u32)
            .filter(|&c| !credential_alone(c))
            .collect();
        let mut local: HashSet<&str> = compiled
            .proxies
            .values()
            .filter(|p| proxy_alone(p, shared_budgets))
            .map(|p| &*p.name)
            .collect();
        // Until nothing moves: a handed-on proxy hands on its credentials, and a
        // handed-on credential every proxy it is bound to.
        loop {
            let before = (handed.len(), local.len());
            for proxy in compiled.proxies.values() {
                if local.contains(&*proxy.name) {
                    if proxy.bound.iter().any(|c| handed.contains(c)) {
                        local.remove(&*proxy.name);
                    }
                } else {
                    handed.extend(proxy.bound.iter().copied());
                }
            }
            if (handed.len(), local.len()) == before {
                break;
            }
        }
        (compiled.proxies.values())
            .filter(|p| local.contains(&*p.name))
            .map(|p| p.name.clone())
            .collect()
    }
}

/// What a proxy does that only `serve` can: read a body, price or guard a response,
/// fetch a token, sign a payload, speak MCP, remember requests or retry them, or hold
/// one for a person.
fn proxy_alone(proxy: &Proxy, shared_budgets: bool) -> bool {
    proxy.ext_proc_only().is_none()
        && !matches!(&*proxy.injection, Injection::OAuth2(_))
        && proxy.mcp.is_none()
        && proxy.guards.duplicate_window_ms.is_none()
        && proxy.guards.retries.is_none()
        && !proxy.guards.idempotency_key
        && !proxy.rules.any_approves()
        && (!shared_budgets || proxy.limits.is_empty())
}

#[cfg(test)]
mod tests {
    use crate::base::crypto::MasterKey;
    use crate::dataplane::snapshot::Policy;
    use crate::store::memory;

    /// `plain` alone; `bodied` reads bodies, and takes `reader` with it, and with
    /// `reader` the `shared` proxy it is bound to, and with `shared` its other
    /// credential `third`, and `third`'s `far`. `limited` goes only when limits are
    /// shared; `held` holds requests for a person.
    const POLICY: &str = r#"
targets:
  - { name: vendor, url: "https://api.vendor.example" }
credentials:
  - { name: vendor-key, type: target, auth: bearer, secret: { value: sk_vendor_1234 } }
  - { name: agent, type: proxy }
  - { name: reader, type: proxy }
  - { name: third, type: proxy }
  - { name: counted, type: proxy, limits: { requests_per_minute: 5 } }
  - { name: careful, type: proxy }
proxies:
  - { name: plain, target: vendor, target_credential: vendor-key, proxy_credentials: [agent] }
  - { name: bodied, target: vendor, target_credential: vendor-key, proxy_credentials: [reader] }
  - { name: shared, target: vendor, target_credential: vendor-key, proxy_credentials: [reader, third] }
  - { name: far, target: vendor, target_credential: vendor-key, proxy_credentials: [third] }
  - { name: limited, target: vendor, target_credential: vendor-key, proxy_credentials: [counted] }
  - { name: held, target: vendor, target_credential: vendor-key, proxy_credentials: [careful] }
rules:
  - { proxy: bodied, effect: deny, body: [{ pointer: /amount, gt: 100 }] }
  - { proxy: held, effect: approve, methods: [DELETE] }
"#;

    fn in_process(shared_budgets: bool) -> Vec<String> {
        let master = MasterKey::parse(&MasterKey::generate()).unwrap();
        let stored = memory::stored(POLICY, &master).unwrap();
        let policy = Policy::compile(&stored, &master, &Default::default()).unwrap();
        let mut names: Vec<String> = (policy.in_process(shared_budgets).into_iter())
            .map(|p| p.to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_proxy_goes_with_everything_bound_to_it() {
        assert_eq!(in_process(false), ["limited", "plain"]);
        assert_eq!(in_process(true), ["plain"]);
    }
}
