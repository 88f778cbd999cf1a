//! One item at a time: targets, credentials, proxies and rules created, read, listed,
//! updated and deleted through the CLI and the gRPC API, each change checked like a
//! whole apply and in effect on the next request.

use latchkey::pb::admin_client::AdminClient;
use latchkey::pb::{
    CreateTokenRequest, GetItemRequest, ItemKind, ListItemsRequest, PutItemRequest,
};
use tonic::Code;

use crate::common::{ADMIN_TOKEN, Stack, Upstream, client, json};

const KEY: &str = "lk_itemsAgentKEY00000000000001";
const SECRET_A: &str = "sk_items_secret_A_0000";
const SECRET_B: &str = "sk_items_secret_B_1111";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("SECRET_A", SECRET_A), ("SECRET_B", SECRET_B), ("KEY", KEY)]
}

fn base(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor-a, url: "{upstream}/a" }}
credentials:
  - {{ name: cred-a, type: target, auth: bearer, secret: {{ env: SECRET_A }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: KEY }}] }}
proxies:
  - {{ name: api-a, target: vendor-a, target_credential: cred-a, proxy_credentials: [agent], default_effect: allow }}
"#
    )
}

/// Runs `latchkey <args>` with `item` as the file given to `-f`.
fn with_file(stack: &Stack, args: &[&str], item: &str) -> std::process::Output {
    let path = stack
        .dir
        .path()
        .join(format!("item-{}.yaml", crate::common::free_port()));
    std::fs::write(&path, item).unwrap();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-f", path.to_str().unwrap()]);
    stack.cli(&all, &env())
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn refused(out: &std::process::Output, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(says), "{says}: {err}");
}

async fn status_of(stack: &Stack, path: &str) -> u16 {
    let r = client()
        .get(stack.url(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

#[tokio::test]
async fn items_one_at_a_time_through_the_cli() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&base(&upstream.url()), &env());

    // A new target, credential and proxy: in effect on the next request.
    let out = ok(&with_file(
        &stack,
        &["target", "create"],
        &format!("{{ name: vendor-b, url: \"{}/b\" }}", upstream.url()),
    ));
    assert!(out.contains("target vendor-b: created"), "{out}");
    refused(
        &with_file(
            &stack,
            &["target", "create"],
            "{ name: vendor-b, url: \"http://x\" }",
        ),
        "already exists",
    );
    ok(&with_file(
        &stack,
        &["credential", "create"],
        "{ name: cred-b, type: target, auth: header, header: X-Key, secret: { env: SECRET_B } }",
    ));
    let proxy_b = "{ name: api-b, target: vendor-b, target_credential: cred-b, proxy_credentials: [agent], default_effect: allow }";
    ok(&with_file(&stack, &["proxy", "create"], proxy_b));
    assert_eq!(status_of(&stack, "/api-b/v1/x").await, 200);
    assert_eq!(status_of(&stack, "/api-a/v1/x").await, 200);
    let seen = upstream.take();
    assert_eq!(seen[0].uri, "/b/v1/x");
    assert_eq!(seen[0].header("x-key"), Some(SECRET_B));
    // Untouched credentials keep their secret through the edits.
    assert_eq!(
        seen[1].header("authorization"),
        Some(format!("Bearer {SECRET_A}").as_str())
    );

    // Get shows the item, its secret only by reference.
    let got = json(&stack.cli(&["credential", "get", "cred-b", "--json"], &[]));
    assert_eq!(got["secret"]["env"], "SECRET_B");
    assert_eq!(got["header"], "X-Key");
    let yaml = ok(&stack.cli(&["credential", "get", "cred-a"], &[]));
    assert!(
        yaml.contains("env: SECRET_A") && !yaml.contains(SECRET_A),
        "{yaml}"
    );
    refused(
        &stack.cli(&["proxy", "get", "nope"], &[]),
        "proxy \"nope\" does not exist",
    );

    // Update replaces the item; a bad field is refused, named, and changes nothing.
    ok(&with_file(
        &stack,
        &["proxy", "update"],
        &proxy_b.replace("allow", "deny"),
    ));
    assert_eq!(status_of(&stack, "/api-b/v1/x").await, 403);
    refused(
        &with_file(
            &stack,
            &["proxy", "update"],
            &proxy_b.replace("default_effect", "default_efect"),
        ),
        "default_efect",
    );
    refused(
        &with_file(
            &stack,
            &["proxy", "update"],
            &proxy_b.replace("api-b", "api-c"),
        ),
        "proxy \"api-c\" does not exist",
    );
    let dry = ok(&with_file(
        &stack,
        &["proxy", "update", "--dry-run"],
        proxy_b,
    ));
    assert!(dry.contains("would change"), "{dry}");
    assert_eq!(status_of(&stack, "/api-b/v1/x").await, 403);

    // Rules by id.
    let rule = "{ id: allow-b, proxy: api-b, effect: allow, methods: [GET], path: \"^/v1/\" }";
    ok(&with_file(&stack, &["rule", "create"], rule));
    assert_eq!(status_of(&stack, "/api-b/v1/x").await, 200);
    let rules = json(&stack.cli(&["rule", "list", "--json"], &[]));
    assert_eq!(rules[0]["id"], "allow-b");
    ok(&with_file(
        &stack,
        &["rule", "update"],
        &rule.replace("^/v1/", "^/v2/"),
    ));
    assert_eq!(status_of(&stack, "/api-b/v1/x").await, 403);
    ok(&stack.cli(&["rule", "delete", "allow-b"], &[]));
    refused(
        &stack.cli(&["rule", "delete", "allow-b"], &[]),
        "does not exist",
    );

    // A delete that would leave a dangling reference is refused, naming it.
    refused(&stack.cli(&["target", "delete", "vendor-b"], &[]), "api-b");
    let out = ok(&stack.cli(&["proxy", "delete", "api-b"], &[]));
    assert!(out.contains("proxy api-b: deleted"), "{out}");
    ok(&stack.cli(&["target", "delete", "vendor-b"], &[]));
    assert_eq!(status_of(&stack, "/api-b/v1/x").await, 404);

    // Lists page by name.
    ok(&with_file(
        &stack,
        &["target", "create"],
        "{ name: vendor-c, url: \"http://c.example\" }",
    ));
    let page = stack.cli(&["target", "list", "--limit", "1"], &[]);
    let table = ok(&page);
    assert!(
        table.starts_with("NAME") && table.contains("vendor-a") && !table.contains("vendor-c"),
        "{table}"
    );
    assert!(String::from_utf8_lossy(&page.stderr).contains("--after vendor-a"));
    let next = json(&stack.cli(&["target", "list", "--after", "vendor-a", "--json"], &[]));
    assert_eq!(next.as_array().unwrap().len(), 1);
    assert_eq!(next[0]["name"], "vendor-c");

    // Keys page too: one imported plus three issued.
    for _ in 0..3 {
        ok(&stack.cli(&["key", "issue", "--credential", "agent"], &[]));
    }
    assert_eq!(
        json(&stack.cli(&["key", "list", "--json"], &[]))
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let first = stack.cli(&["key", "list", "--limit", "3", "--json"], &[]);
    let page: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 3);
    let last_id = page[2]["id"].as_str().unwrap();
    assert!(String::from_utf8_lossy(&first.stderr).contains(&format!("--after {last_id}")));
    let rest = json(&stack.cli(&["key", "list", "--after", last_id, "--json"], &[]));
    assert_eq!(rest.as_array().unwrap().len(), 1);
    assert!(rest[0]["id"].as_str().unwrap() > last_id);

    // The whole policy still round-trips.
    let exported = ok(&stack.cli(&["export"], &[]));
    assert!(stack.apply(&exported, &env()).contains("no changes"));
    for secret in [SECRET_A, SECRET_B, KEY] {
        assert!(!stack.log("latchkey").contains(secret));
    }
}

fn auth<T>(token: Option<&str>, mut request: tonic::Request<T>) -> tonic::Request<T> {
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn item_rpcs_check_tokens_and_name_what_is_wrong() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&base(&upstream.url()), &env());
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{}", stack.admin_port))
        .await
        .unwrap();
    let put = |spec: &str| PutItemRequest {
        kind: ItemKind::Target as i32,
        spec: spec.into(),
        ..Default::default()
    };
    let viewer = admin
        .create_token(auth(
            Some(ADMIN_TOKEN),
            tonic::Request::new(CreateTokenRequest {
                name: "ro".into(),
                role: "viewer".into(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .token;

    let err = admin
        .create_item(tonic::Request::new(put("{ name: t, url: \"http://t\" }")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = admin
        .create_item(auth(
            Some(&viewer),
            tonic::Request::new(put("{ name: t, url: \"http://t\" }")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin
        .create_item(auth(
            Some(ADMIN_TOKEN),
            tonic::Request::new(put("{ name: t, url: \"ftp://t\" }")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("url"), "{}", err.message());
    let err = admin
        .get_item(auth(
            Some(&viewer),
            tonic::Request::new(GetItemRequest {
                kind: ItemKind::Proxy as i32,
                name: "ghost".into(),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("ghost"));
    let err = admin
        .list_items(auth(
            Some(&viewer),
            tonic::Request::new(ListItemsRequest::default()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("kind"));
    // A viewer reads; a secret never comes back.
    let page = admin
        .list_items(auth(
            Some(&viewer),
            tonic::Request::new(ListItemsRequest {
                kind: ItemKind::Credential as i32,
                ..Default::default()
            }),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.items.len(), 2);
    assert!(page.items.iter().all(|i| !i.spec_json.contains(SECRET_A)));
}

/// Without `--limit`, every page: more than the server's largest page comes back whole;
/// with it, one page and where the next begins.
#[tokio::test]
async fn list_without_a_limit_returns_every_page() {
    let stack = Stack::start().await;
    let mut policy = String::from("targets:\n");
    for i in 0..1050 {
        policy.push_str(&format!(
            "  - {{ name: t{i:04}, url: \"https://t{i}.example\" }}\n"
        ));
    }
    stack.apply(&policy, &[]);
    let all = json(&stack.cli(&["target", "list", "--json"], &[]));
    assert_eq!(all.as_array().unwrap().len(), 1050);
    let page = stack.cli(&["target", "list", "--limit", "100"], &[]);
    assert!(
        String::from_utf8_lossy(&page.stderr).contains("more: --after t0099"),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
}
