//! `netpol-apiserver` as its clients see it: the agent's kube source
//! configured in-cluster, TLS checked against the CA it wrote, the token
//! required, writes answered as the API server answers them and reaching
//! watches, a restart on the same folder and port trusted and resumed
//! from, and kubectl.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use netpol_agent::sources::{
    Input,
    kube::{KubeConnection, KubeSource},
};
use netpol_testkit::apiserver::{self, Credentials, Process};
use serde_json::{Value, json};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_netpol-apiserver");
const DEADLINE: Duration = Duration::from_secs(30);
const ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The folder the kubelet mounts a service account at; kube-rs reads it
/// from this fixed path only.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(netpol_testkit::unique("netpol-apiserver-test-"));
        std::fs::create_dir_all(&d).expect("temp dir");
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node, a namespace, a pod on the node and a policy selecting it.
const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, uid: uid-a, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, image: nginx}]}
status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {}}]}]}
";

/// The labels a stored policy's pod selector matches.
fn selected(np: NetworkPolicy) -> Option<std::collections::BTreeMap<String, String>> {
    np.spec
        .expect("spec")
        .pod_selector
        .expect("a selector")
        .match_labels
}

fn policy(name: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "x"},
           "spec": {"podSelector": {}}})
}

/// The server on a free port with [`CLUSTER`] preloaded.
fn start(dir: &TempDir) -> Process {
    let manifests = dir.0.join("cluster.yaml");
    std::fs::write(&manifests, CLUSTER).expect("manifests");
    let tls = dir.0.join("tls");
    Process::start(
        Path::new(BIN),
        ANY_PORT,
        &tls,
        &["--manifests", &manifests.display().to_string()],
    )
    .expect("netpol-apiserver starts")
}

/// A client from the kubeconfig the server wrote, with `token` instead of
/// its own when given, and none at all when `Some(None)`.
async fn kubeconfig_client(p: &Process, token: Option<Option<&str>>) -> Client {
    let mut kc = Kubeconfig::read_from(p.credentials().kubeconfig()).expect("kubeconfig");
    if let Some(t) = token {
        kc.auth_infos[0].auth_info.as_mut().expect("user").token = t.map(|t| t.to_owned().into());
    }
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn policies_of(input: &Input) -> BTreeSet<String> {
    input
        .snapshot
        .policies
        .keys()
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .collect()
}

/// Waits for a published input that satisfies `pred`.
async fn input_until(
    inputs: &mut watch::Receiver<Option<Arc<Input>>>,
    what: &str,
    mut pred: impl FnMut(&Input) -> bool,
) {
    let r = tokio::time::timeout(
        DEADLINE,
        inputs.wait_for(|i| i.as_deref().is_some_and(&mut pred)),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        r,
        "{what}: not within {DEADLINE:?}; last input's policies: {:?}",
        inputs.borrow().as_deref().map(policies_of)
    );
}

/// The agent's `KubeConnection::Infer`, in a mount namespace where the
/// server's service account folder is at the fixed path and with only the
/// in-cluster environment (no kubeconfig to find): what the agent does in
/// a pod. The work is [`in_cluster_child`]'s, this binary run again.
#[test]
fn the_kube_source_configured_in_cluster_lists_watches_and_sees_a_created_policy() {
    if !netpol_testkit::privileged() {
        return;
    }
    let dir = TempDir::new();
    let p = start(&dir);
    let exe = std::env::current_exe().expect("this test binary");
    // A private /run (so /var/run) holding only the service account.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p \"$0\" && mount --bind \"$NETPOL_SA\" \"$0\" \
             && exec \"$@\"",
        )
        .arg(SERVICE_ACCOUNT)
        .arg(&exe)
        .args(["in_cluster_child", "--exact", "--ignored", "--nocapture"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &dir.0)
        .env("KUBERNETES_SERVICE_HOST", p.addr().ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", p.addr().port().to_string())
        .env("NETPOL_SA", p.credentials().service_account())
        .env("NETPOL_TEST_TLS_DIR", &p.credentials().dir)
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test in_cluster_child ... ok"),
        "the in-cluster child failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
#[ignore = "run by the_kube_source_configured_in_cluster_... in a mount namespace"]
async fn in_cluster_child() {
    let Some(tls_dir) = std::env::var_os("NETPOL_TEST_TLS_DIR") else {
        return;
    };
    assert!(Path::new(SERVICE_ACCOUNT).join("token").is_file());
    let client = KubeConnection::Infer
        .client()
        .await
        .expect("the in-cluster configuration");
    assert_eq!(client.default_namespace(), "default", "the namespace file");
    let source = KubeSource::new(client, "n1");
    let (tx, mut inputs) = watch::channel(None);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(source.run(tx, stop_rx));
    input_until(&mut inputs, "the preloaded cluster", |i| {
        i.snapshot.pods.len() == 1
            && i.snapshot.nodes.contains_key("n1")
            && policies_of(i) == BTreeSet::from(["x/allow".to_owned()])
    })
    .await;

    // Created by another client (the kubeconfig's), seen by the watch.
    let url = format!(
        "https://{}:{}",
        std::env::var("KUBERNETES_SERVICE_HOST").expect("host"),
        std::env::var("KUBERNETES_SERVICE_PORT").expect("port")
    );
    let writer = Credentials::read(Path::new(&tls_dir))
        .expect("credentials")
        .client(&url)
        .expect("a client");
    apiserver::create(&writer, policy("deny"))
        .await
        .expect("create");
    input_until(&mut inputs, "the created policy", |i| {
        policies_of(i).contains("x/deny")
    })
    .await;
    apiserver::delete(&writer, "NetworkPolicy", "x", "allow")
        .await
        .expect("delete");
    input_until(&mut inputs, "the deleted policy", |i| {
        policies_of(i) == BTreeSet::from(["x/deny".to_owned()])
    })
    .await;
    let _ = stop.send(true);
    task.await.expect("the source task").expect("it stops");
}

#[tokio::test]
async fn requests_without_the_token_or_with_a_wrong_one_get_401() {
    let dir = TempDir::new();
    let p = start(&dir);
    for (what, token) in [("no token", None), ("a wrong token", Some("not-the-token"))] {
        let c = kubeconfig_client(&p, Some(token)).await;
        let e = Api::<Pod>::all(c.clone())
            .list(&ListParams::default())
            .await
            .expect_err(what);
        assert_eq!(api_code(&e), Some(401), "{what}: {e}");
        let e = apiserver::create(&c, policy("sneaky"))
            .await
            .expect_err(what);
        assert_eq!(api_code(&e), Some(401), "{what}, a create: {e}");
    }
    // The server's own token is accepted, and nothing was written.
    let c = kubeconfig_client(&p, None).await;
    let names: Vec<String> = Api::<NetworkPolicy>::all(c)
        .list(&ListParams::default())
        .await
        .expect("the token is accepted")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, ["allow"]);
}

#[tokio::test]
async fn writes_are_answered_as_the_api_server_answers_them() {
    let dir = TempDir::new();
    let p = start(&dir);
    let c = p.client().expect("a client");
    let created = apiserver::create(&c, policy("deny")).await.expect("create");
    for field in ["resourceVersion", "uid", "creationTimestamp"] {
        assert!(created["metadata"][field].is_string(), "{field}: {created}");
    }
    let e = apiserver::create(&c, policy("deny"))
        .await
        .expect_err("a duplicate");
    assert!(
        matches!(&e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{e}"
    );

    let policies: Api<NetworkPolicy> = Api::namespaced(c.clone(), "x");
    let mut np = policies.get("deny").await.expect("get");
    np.metadata.labels = Some([("team".to_owned(), "a".to_owned())].into());
    let replaced = policies
        .replace("deny", &PostParams::default(), &np)
        .await
        .expect("replace");
    assert_ne!(
        replaced.metadata.resource_version, np.metadata.resource_version,
        "a replace is a new version"
    );
    assert_eq!(replaced.metadata.uid, np.metadata.uid);
    let e = policies
        .replace("deny", &PostParams::default(), &np)
        .await
        .expect_err("a replace of an older version");
    assert_eq!(api_code(&e), Some(409), "{e}");
    let e = policies.get("missing").await.expect_err("missing");
    assert!(
        matches!(&e, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{e}"
    );

    policies
        .delete("deny", &DeleteParams::default())
        .await
        .expect("delete");
    let e = apiserver::delete(&c, "NetworkPolicy", "x", "deny")
        .await
        .expect_err("deleted already");
    assert_eq!(api_code(&e), Some(404), "{e}");
    // A namespaced list sees only its namespace.
    assert_eq!(
        Api::<NetworkPolicy>::namespaced(c.clone(), "y")
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        0
    );
}

#[tokio::test]
async fn a_restarted_server_on_the_same_folder_and_port_is_trusted_and_watched_again() {
    let dir = TempDir::new();
    let mut p = start(&dir);
    let token = p.credentials().token.clone();
    let c = p.client().expect("a client");
    let (seen_tx, mut seen) = watch::channel(BTreeSet::<String>::new());
    let api: Api<NetworkPolicy> = Api::all(c.clone());
    let watching = tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut names = BTreeSet::new();
        let mut relist = BTreeSet::new();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(o)) => {
                    names.insert(o.metadata.name.unwrap_or_default());
                }
                Ok(watcher::Event::Delete(o)) => {
                    names.remove(&o.metadata.name.unwrap_or_default());
                }
                Ok(watcher::Event::Init) => relist.clear(),
                Ok(watcher::Event::InitApply(o)) => {
                    relist.insert(o.metadata.name.unwrap_or_default());
                }
                Ok(watcher::Event::InitDone) => names = std::mem::take(&mut relist),
                Err(_) => continue,
            }
            seen_tx.send_replace(names.clone());
        }
    });
    let until = async |seen: &mut watch::Receiver<BTreeSet<String>>, want: &[&str]| {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        let r = tokio::time::timeout(DEADLINE, seen.wait_for(|s| *s == want))
            .await
            .is_ok();
        assert!(r, "want {want:?}, seen {:?}", *seen.borrow());
    };
    until(&mut seen, &["allow"]).await;
    // History the restarted server will not have: the watch is at a
    // version it has not issued yet when the next create happens.
    for name in ["t1", "t2"] {
        p.create(policy(name)).await.expect("create");
    }
    for name in ["t1", "t2"] {
        p.delete("NetworkPolicy", "x", name).await.expect("delete");
    }
    until(&mut seen, &["allow"]).await;

    p.restart().expect("it starts again");
    assert_eq!(
        Credentials::read(&p.credentials().dir)
            .expect("credentials")
            .token,
        token,
        "the same token"
    );
    // The client built before the restart trusts it and is let in.
    Api::<Pod>::all(c.clone())
        .list(&ListParams::default())
        .await
        .expect("the restarted server is trusted");
    p.create(policy("after-restart")).await.expect("create");
    until(&mut seen, &["after-restart", "allow"]).await;
    watching.abort();
}

/// kubectl, as a developer would run it against the server.
#[tokio::test]
async fn kubectl_create_get_apply_replace_label_annotate_patch_and_delete() {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("skipping: no kubectl on PATH");
        return;
    }
    let dir = TempDir::new();
    let p = start(&dir);
    let kubeconfig = p.credentials().kubeconfig();
    let file = dir.0.join("np.yaml");
    let kubectl = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--request-timeout=20s")
            .args(args)
            .output()
            .expect("kubectl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let write = |selector: &str| {
        std::fs::write(
            &file,
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: deny, namespace: x}}\nspec: {{podSelector: {selector}}}\n"
            ),
        )
        .expect("np.yaml");
    };
    let f = file.display().to_string();
    let stored = async |name: &str| {
        Api::<NetworkPolicy>::namespaced(p.client().expect("client"), "x")
            .get_opt(name)
            .await
            .expect("get")
    };

    write("{}");
    let (ok, out) = kubectl(&["create", "-f", &f]);
    assert!(ok && out.contains("created"), "{out}");
    assert!(stored("deny").await.is_some());
    let (ok, out) = kubectl(&["create", "-f", &f]);
    assert!(!ok && out.contains("AlreadyExists"), "{out}");

    let (ok, out) = kubectl(&["get", "networkpolicies", "-n", "x", "-o", "json"]);
    assert!(ok, "{out}");
    let list: Value = serde_json::from_str(&out).expect("a JSON list");
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["allow", "deny"]);
    let (ok, out) = kubectl(&["get", "netpol", "-A"]);
    assert!(ok && out.contains("deny") && out.contains("allow"), "{out}");

    write("{matchLabels: {app: a}}");
    let (ok, out) = kubectl(&["apply", "-f", &f]);
    assert!(ok && out.contains("configured"), "{out}");
    let np = stored("deny").await.expect("deny");
    let selector = selected(np);
    assert_eq!(selector, Some([("app".to_owned(), "a".to_owned())].into()));

    write("{matchLabels: {app: b}}");
    let (ok, out) = kubectl(&["replace", "-f", &f]);
    assert!(ok && out.contains("replaced"), "{out}");
    let (ok, out) = kubectl(&["label", "netpol", "deny", "-n", "x", "team=a"]);
    assert!(ok && out.contains("labeled"), "{out}");
    let np = stored("deny").await.expect("deny");
    assert_eq!(
        np.metadata.labels,
        Some([("team".to_owned(), "a".to_owned())].into())
    );
    assert_eq!(
        selected(np),
        Some([("app".to_owned(), "b".to_owned())].into())
    );

    let patch = |kind: &str, body: &str| {
        kubectl(&[
            "patch", "netpol", "deny", "-n", "x", "--type", kind, "-p", body,
        ])
    };
    let (ok, out) = kubectl(&["annotate", "netpol", "deny", "-n", "x", "note=hi"]);
    assert!(ok && out.contains("annotated"), "{out}");
    let (ok, out) = patch(
        "json",
        r#"[{"op": "replace", "path": "/spec/podSelector/matchLabels/app", "value": "c"}]"#,
    );
    assert!(ok && out.contains("patched"), "{out}");
    let (ok, out) = patch("merge", r#"{"metadata": {"labels": {"tier": "web"}}}"#);
    assert!(ok && out.contains("patched"), "{out}");
    let np = stored("deny").await.expect("deny");
    assert_eq!(
        np.metadata.annotations,
        Some([("note".to_owned(), "hi".to_owned())].into())
    );
    assert_eq!(
        np.metadata.labels,
        Some(
            [
                ("team".to_owned(), "a".to_owned()),
                ("tier".to_owned(), "web".to_owned())
            ]
            .into()
        )
    );
    assert_eq!(
        selected(np),
        Some([("app".to_owned(), "c".to_owned())].into())
    );
    // A JSON patch whose test fails changes nothing.
    let (ok, out) = patch(
        "json",
        r#"[{"op": "replace", "path": "/spec/podSelector/matchLabels/app", "value": "d"},
            {"op": "test", "path": "/metadata/name", "value": "other"}]"#,
    );
    assert!(
        !ok && out.contains("test of /metadata/name failed"),
        "{out}"
    );
    write("{matchLabels: {app: b}}");
    let (ok, out) = kubectl(&["replace", "-f", &f]);
    assert!(ok && out.contains("replaced"), "{out}");

    // YAML reads an unquoted `y` as true: the API server refuses a label
    // value that is not a string, and the stored policy stays as it was.
    write("{matchLabels: {app: y}}");
    let (ok, out) = kubectl(&["replace", "-f", &f]);
    assert!(
        !ok && out.contains("cannot be handled as a NetworkPolicy"),
        "{out}"
    );
    assert_eq!(
        selected(stored("deny").await.expect("deny")),
        Some([("app".to_owned(), "b".to_owned())].into())
    );

    let (ok, out) = kubectl(&["delete", "-f", &f]);
    assert!(ok && out.contains("deleted"), "{out}");
    assert!(stored("deny").await.is_none());
    let (ok, out) = kubectl(&["get", "netpol", "deny", "-n", "x"]);
    assert!(!ok && out.contains("NotFound"), "{out}");
}

#[tokio::test]
async fn it_serves_ipv6_writes_its_ready_file_and_refuses_a_kind_it_does_not_serve() {
    let dir = TempDir::new();
    let ready = dir.0.join("ready");
    let tls = dir.0.join("tls");
    let v6: SocketAddr = "[::1]:0".parse().expect("an address");
    let p = Process::start(
        Path::new(BIN),
        v6,
        &tls,
        &["--ready-file", &ready.display().to_string()],
    )
    .expect("it starts on ::1");
    assert_eq!(
        std::fs::read_to_string(&ready).expect("the ready file"),
        format!("listening on {}\n", p.url())
    );
    // The certificate covers the address (a client checks the name).
    Api::<Pod>::all(p.client().expect("a client"))
        .list(&ListParams::default())
        .await
        .expect("listed over IPv6");
    drop(p);

    let bad = dir.0.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: x}\n",
    )
    .expect("a manifest");
    let e = Process::start(
        Path::new(BIN),
        ANY_PORT,
        &tls,
        &["--manifests", &bad.display().to_string()],
    )
    .expect_err("a kind it does not serve");
    assert!(e.to_string().contains("did not start"), "{e}");
}
