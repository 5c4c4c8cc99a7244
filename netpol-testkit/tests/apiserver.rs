//! `netpol-apiserver` as a client sees it: TLS checked against the CA it
//! wrote, the token required, writes reaching lists, and a restart on the
//! same folder and port trusted by clients already configured.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(dir: &Path, listen: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netpol-apiserver"))
            .args(["--listen", listen, "--tls-dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("netpol-apiserver starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("its first line");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("it said {line:?}"))
            .to_owned();
        Self { child, url }
    }

    fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(netpol_testkit::unique("netpol-apiserver-test-"));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

async fn client(dir: &Path, token: Option<&str>) -> Client {
    let mut kc = Kubeconfig::read_from(dir.join("kubeconfig")).expect("kubeconfig");
    if let Some(t) = token {
        kc.auth_infos[0].auth_info.as_mut().expect("user").token = Some(t.to_owned().into());
    }
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

async fn count(api: &Api<NetworkPolicy>) -> usize {
    api.list(&ListParams::default())
        .await
        .expect("list")
        .items
        .len()
}

fn policy(name: &str) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": {"podSelector": {}}
    }))
    .expect("a policy")
}

#[tokio::test]
async fn tls_token_writes_and_a_restart_on_the_same_folder() {
    let dir = temp_dir();
    let server = Server::start(&dir, "127.0.0.1:0");
    assert!(server.url.starts_with("https://"), "{}", server.url);
    for f in [
        "ca.crt",
        "serviceaccount/token",
        "serviceaccount/ca.crt",
        "serviceaccount/namespace",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let c = client(&dir, None).await;
    let policies: Api<NetworkPolicy> = Api::namespaced(c.clone(), "x");
    let all: Api<NetworkPolicy> = Api::all(c.clone());
    assert_eq!(count(&all).await, 0);

    // Created through the API: listed, and a second create conflicts.
    let created = policies
        .create(&PostParams::default(), &policy("deny"))
        .await
        .expect("create");
    assert!(created.metadata.resource_version.is_some());
    assert_eq!(count(&all).await, 1);
    let e = policies
        .create(&PostParams::default(), &policy("deny"))
        .await
        .expect_err("a duplicate");
    assert!(e.to_string().contains("already exists"), "{e}");
    policies
        .delete("deny", &DeleteParams::default())
        .await
        .expect("delete");
    assert_eq!(count(&all).await, 0);

    // A wrong token is refused as a real API server refuses it.
    let wrong = client(&dir, Some("not-the-token")).await;
    let e = Api::<Pod>::all(wrong)
        .list(&ListParams::default())
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("Unauthorized"), "{e}");

    // Restarted on the same port and folder: the same client trusts it.
    let port = server.port();
    drop(server);
    let again = Server::start(&dir, &format!("127.0.0.1:{port}"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    Api::<Pod>::all(c)
        .list(&ListParams::default())
        .await
        .expect("the restarted server is trusted");
    drop(again);
    let _ = std::fs::remove_dir_all(&dir);
}
