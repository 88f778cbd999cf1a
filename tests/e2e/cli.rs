//! The command line as people and programs use it: `-o table|json|yaml` (and `--json`)
//! on every command, `doctor`, shell completions and the manual page.

use std::process::Output;

use crate::common::{Stack, Upstream, free_port};

const AGENT_KEY: &str = "lk_cliAgentKEY00000000000001";

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-key, type: target, auth: bearer, secret: {{ value: sk_cli_secret }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - {{ name: vendor, target: vendor, target_credential: vendor-key, proxy_credentials: [agent], default_effect: deny }}
rules:
  - {{ proxy: vendor, effect: allow, methods: [GET], path: "^/v1/" }}
"#
    )
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text(&out)
}

#[tokio::test]
async fn every_command_prints_json_yaml_or_a_table() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &[]);
    ok(stack.cli(
        &["key", "issue", "--credential", "agent", "--label", "run-1"],
        &[],
    ));

    // The same document as JSON, as YAML, and with --json; a table otherwise.
    for args in [
        &["key", "list"][..],
        &["token", "list"],
        &["target", "list"],
        &["credential", "get", "vendor-key"],
        &["requests"],
        &["telemetry"],
        &["apply", "--dry-run", "-f"],
    ] {
        let path = stack.dir.path().join("policy.yaml");
        std::fs::write(&path, policy(&upstream.url())).unwrap();
        let with = |extra: &[&str]| {
            let mut all: Vec<&str> = args.to_vec();
            if args.ends_with(&["-f"]) {
                all.push(path.to_str().unwrap());
            }
            all.extend(extra);
            ok(stack.cli(&all, &[]))
        };
        let json: serde_json::Value = serde_json::from_str(&with(&["-o", "json"])).unwrap();
        let yaml: serde_json::Value = serde_norway::from_str(&with(&["-o", "yaml"])).unwrap();
        let alias: serde_json::Value = serde_json::from_str(&with(&["--json"])).unwrap();
        assert_eq!(json, yaml, "{args:?}");
        assert_eq!(json, alias, "{args:?}");
        let table = with(&[]);
        assert!(
            serde_json::from_str::<serde_json::Value>(&table).is_err(),
            "{args:?}: {table}"
        );
    }
    let listed = ok(stack.cli(&["key", "list", "-o", "table"], &[]));
    assert!(
        listed.starts_with("ID ") && listed.contains("run-1"),
        "{listed}"
    );

    // check: 0 allowed, 1 denied, 2 on error, whatever the format.
    let check = |method: &str, format: &str| {
        let args = [
            "check",
            "--proxy",
            "vendor",
            "--method",
            method,
            "--path",
            "/v1/charges",
            "--credential",
            "agent",
            "-o",
            format,
        ];
        stack.cli(&args, &[])
    };
    let allowed = check("GET", "yaml");
    assert_eq!(allowed.status.code(), Some(0));
    let doc: serde_json::Value = serde_norway::from_str(&text(&allowed)).unwrap();
    assert_eq!(doc["allowed"], true);
    let denied = check("DELETE", "json");
    assert_eq!(denied.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_str(&text(&denied)).unwrap();
    assert_eq!(doc["decision"], "rule_denied");
    assert_eq!(check("GET", "xml").status.code(), Some(2));

    // export: a format to standard output, or a file (JSON for a .json name).
    let yaml = ok(stack.cli(&["export"], &[]));
    let as_json: serde_json::Value =
        serde_json::from_str(&ok(stack.cli(&["export", "-o", "json"], &[]))).unwrap();
    assert_eq!(
        as_json,
        serde_norway::from_str::<serde_json::Value>(&yaml).unwrap()
    );
    let file = stack.dir.path().join("exported.json");
    ok(stack.cli(&["export", "-o", file.to_str().unwrap()], &[]));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(written, as_json);
    assert!(!yaml.contains("sk_cli_secret"));

    // Revocations and master keys, for programs too.
    let id = serde_json::from_str::<serde_json::Value>(&ok(stack.cli(
        &["key", "issue", "--credential", "agent", "-o", "json"],
        &[],
    )))
    .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked: serde_json::Value =
        serde_norway::from_str(&ok(stack.cli(&["key", "revoke", &id, "-o", "yaml"], &[]))).unwrap();
    assert_eq!(revoked["already_revoked"], false);
    let key: serde_json::Value =
        serde_json::from_str(&ok(stack.cli(&["keygen", "--json"], &[]))).unwrap();
    assert_eq!(key["master_key"].as_str().unwrap().len(), 44);
}

#[tokio::test]
async fn doctor_passes_on_a_working_setup_and_names_what_is_broken() {
    let upstream = Upstream::start().await;
    let dead = free_port();
    let otlp = format!("http://127.0.0.1:{dead}");
    let stack = Stack::start_configured(|c| c, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)]).await;
    stack.apply(&policy(&upstream.url()), &[]);
    let envoy = format!("http://127.0.0.1:{}", stack.envoy_port);

    let out = stack.cli(&["doctor", "--envoy", &envoy, "-o", "json"], &[]);
    let checks: Vec<serde_json::Value> = serde_json::from_str(&text(&out)).unwrap();
    let result = |name: &str| -> (String, String) {
        let c = checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {checks:?}"));
        (
            c["result"].as_str().unwrap().to_owned(),
            c["detail"].as_str().unwrap().to_owned(),
        )
    };
    for name in [
        "admin", "version", "policy", "store", "redis", "secrets", "envoy",
    ] {
        assert_eq!(result(name).0, "ok", "{name}: {checks:#?}");
    }
    assert!(result("admin").1.contains("role: admin"));
    assert!(
        result("envoy")
            .1
            .contains("latchkey answered through Envoy"),
        "{checks:#?}"
    );
    // The collector is down: named, and the exit code says a check failed.
    assert_eq!(result("otlp").0, "fail");
    assert!(result("otlp").1.contains(&dead.to_string()));
    assert_eq!(out.status.code(), Some(1));

    // Envoy not there; the admin API not there.
    let nothing = format!("http://127.0.0.1:{}", free_port());
    let out = stack.cli(&["doctor", "--envoy", &nothing], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with("fail") && l.contains("envoy"))
    );
    let out = stack.cli(
        &["doctor"],
        &[("LATCHKEY_ADMIN_ADDR", &format!("127.0.0.1:{}", free_port()))],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with("fail") && l.contains("admin")),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn completions_and_the_manual_page_are_generated() {
    let stack = Stack::start().await;
    let bash = ok(stack.cli(&["completions", "bash"], &[]));
    assert!(
        bash.contains("_latchkey") && bash.contains("doctor"),
        "{bash}"
    );
    let zsh = ok(stack.cli(&["completions", "zsh"], &[]));
    assert!(zsh.starts_with("#compdef latchkey"));
    let man = ok(stack.cli(&["man"], &[]));
    assert!(
        man.contains(".TH latchkey") && man.contains("doctor"),
        "{man}"
    );
}
