//! `netpol-agent compile`: the documented JSON shape and exit statuses.

use std::path::PathBuf;
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("netpol-compile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn cluster_yaml() -> String {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance/cluster.yaml"
    );
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("conformance cluster missing at {p}: {e}"))
}

fn run(dir: &PathBuf, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .arg("compile")
        .arg("--manifests")
        .arg(dir)
        .args(extra)
        .output()
        .expect("run netpol-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn json_output_lists_endpoints_entries_rulesets_and_errors() {
    let d = temp_dir("json");
    std::fs::write(d.join("cluster.yaml"), cluster_yaml()).unwrap();
    std::fs::write(
        d.join("policies.yaml"),
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: base, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: serve-80-tcp}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, ingress: [{}, {ports: [{port: 90, endPort: 85}]}]}
"#,
    )
    .unwrap();
    let (code, out) = run(&d, &["-o", "json", "--node", "node-1"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["version"], 1);
    assert_eq!(v["node"], "node-1");
    let eps = v["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 9);
    let xa = &eps[0];
    assert_eq!(xa["pod"], "x/a");
    assert_eq!(xa["ingress"]["isolated"], true);
    assert_eq!(xa["egress"]["isolated"], false);
    assert_eq!(xa["ingress"]["ipv4"][0]["prefix"], "10.42.1.12/32");
    assert_eq!(
        xa["ingress"]["ipv4"][0]["rules"][0],
        "x/base: spec.ingress[0]"
    );
    let rs = xa["ingress"]["ipv4"][0]["ruleset"].as_u64().unwrap();
    let set = v["rulesets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"].as_u64() == Some(rs))
        .unwrap();
    assert_eq!(set["ports"][0]["protocol"], "TCP");
    assert_eq!(set["ports"][0]["first"], 80);
    // Named by its file, as `run` names it.
    assert_eq!(
        v["errors"][0]["text"],
        format!(
            "{}: x/deny-all: spec.ingress[1].ports[0].endPort: less than port",
            d.join("policies.yaml").display()
        )
    );
    assert!(v["summary"]["bytes"].as_u64().unwrap() > 0);
    let (code, table) = run(&d, &[]);
    assert_eq!(code, 0);
    assert!(table.contains("x/base: spec.ingress[0]"), "{table}");
}

#[test]
fn exit_status_is_non_zero_only_when_nothing_compiles() {
    let d = temp_dir("empty");
    std::fs::write(
        d.join("bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n",
    )
    .unwrap();
    let (code, _) = run(&d, &["-o", "json"]);
    assert_ne!(code, 0);
}
