//! The kube source against a fake API server in the test process: the
//! model converges to the server's objects across watch events, a watch
//! that ends, a `410 Gone` and an API outage; nothing is published until
//! every store has listed.
use std::{sync::Arc, time::Duration};

use netpol_agent::{
    model::{
        Snapshot,
        manifests::{LoadReport, apply_value},
    },
    sources::{
        Input, SourceHealth, fingerprint,
        kube::{KubeError, KubeSource},
    },
    status::Metrics,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use netpol_testkit::fake_apiserver::FakeApiServer;

/// Long enough for kube-rs' default backoff (0.8 s, doubling) to retry
/// a few times.
const DEADLINE: Duration = Duration::from_secs(30);

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"team": name}}})
}

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn pod(name: &str, ip: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "x", "uid": format!("uid-{name}"),
                        "labels": {"app": name},
                        "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx",
                    "ports": [{"name": "http", "containerPort": 80}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(name: &str, port: u16) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "x"},
           "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                    "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": port}]}]}})
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "x"},
           "spec": {"selector": {"app": "a"}, "ports": [{"port": 80}]}})
}

fn endpoint_slice(name: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "x"}, "addressType": "IPv4",
           "endpoints": [{"addresses": ["10.0.0.1"]}]})
}

fn cluster_policy(name: &str, port: u16) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name},
           "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                    "egress": [{"action": "Deny", "to": [{"nodes": {}}],
                                "protocols": [{"tcp": {"destinationPort": {"number": port}}}]}]}})
}

/// What the source should publish for the server's objects: the same
/// conversion, from the JSON the server holds (every Node: a
/// ClusterNetworkPolicy's `nodes` peer may select any).
fn expected(fake: &FakeApiServer, _local: &str) -> String {
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    for obj in fake.objects() {
        apply_value(&mut snap, obj, "fake", &mut report);
    }
    fingerprint(&snap)
}

struct Running {
    inputs: watch::Receiver<Option<Arc<Input>>>,
    health: watch::Receiver<SourceHealth>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), KubeError>>,
    metrics: Arc<Metrics>,
}

impl Running {
    fn start(fake: &FakeApiServer, node: &str) -> Self {
        let url = fake.url().parse().expect("the fake's URL");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("a client");
        let metrics = Arc::new(Metrics::new());
        let source = KubeSource::new(client, node).metrics(metrics.clone());
        let health = source.health();
        let (tx, inputs) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(source.run(tx, stop_rx));
        Self {
            inputs,
            health,
            stop,
            task,
            metrics,
        }
    }

    /// Waits until the published input has `fingerprint`.
    async fn converged(&mut self, what: &str, fingerprint: &str) -> Arc<Input> {
        let found = match tokio::time::timeout(
            DEADLINE,
            self.inputs.wait_for(|i| {
                i.as_deref()
                    .is_some_and(|i| netpol_agent::fingerprint(&i.snapshot) == fingerprint)
            }),
        )
        .await
        {
            Ok(Ok(i)) => i.clone(),
            _ => None,
        };
        match found {
            Some(i) => i,
            None => {
                let last = self.inputs.borrow().clone();
                panic!(
                    "{what}: no input with fingerprint {fingerprint} within {DEADLINE:?}; last: {:?}",
                    last.map(|i| (
                        fingerprint_of(&i),
                        i.snapshot.pods.keys().cloned().collect::<Vec<_>>()
                    ))
                )
            }
        }
    }

    async fn health_until(
        &mut self,
        what: &str,
        pred: impl FnMut(&SourceHealth) -> bool,
    ) -> SourceHealth {
        let found = match tokio::time::timeout(DEADLINE, self.health.wait_for(pred)).await {
            Ok(Ok(h)) => Some(h.clone()),
            _ => None,
        };
        found.unwrap_or_else(|| {
            panic!(
                "{what}: not within {DEADLINE:?}; health: {:?}",
                *self.health.borrow()
            )
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("the source task")
            .expect("the source stops cleanly");
    }
}

fn fingerprint_of(i: &Input) -> String {
    fingerprint(&i.snapshot)
}

async fn cluster() -> FakeApiServer {
    let fake = FakeApiServer::start().await;
    fake.apply_all([
        namespace("x"),
        node("n1", "192.168.0.1"),
        node("n2", "192.168.0.2"),
        pod("a", "10.0.0.1", "n1"),
        pod("b", "10.0.0.2", "n2"),
        policy("allow-80", 80),
        service("s"),
        endpoint_slice("s-1"),
        cluster_policy("no-ssh-to-nodes", 22),
    ]);
    fake
}

#[tokio::test]
async fn model_converges_to_the_servers_objects_through_watch_end_and_410() {
    let fake = cluster().await;
    let mut src = Running::start(&fake, "n1");
    let first = src.converged("initial list", &expected(&fake, "n1")).await;
    assert_eq!(first.snapshot.pods.len(), 2);
    assert_eq!(
        first.snapshot.nodes.keys().collect::<Vec<_>>(),
        ["n1", "n2"],
        "every Node is watched"
    );
    assert_eq!(first.snapshot.cluster_policies.len(), 1);
    assert!(first.problems.is_empty(), "{:?}", first.problems);

    // Watch events: added, modified, deleted.
    fake.apply(pod("c", "10.0.0.3", "n1"));
    fake.apply(policy("allow-80", 8080));
    fake.apply(cluster_policy("no-ssh-to-nodes", 2222));
    assert!(fake.delete("Pod", "x", "b"));
    src.converged("watch events", &expected(&fake, "n1")).await;

    // A watch that ends: the source watches again from where it was.
    let lists = fake.lists("Pod");
    let watches = fake.watches("Pod");
    fake.end_watches();
    fake.apply(pod("d", "10.0.0.4", "n1"));
    src.converged("after the watch ended", &expected(&fake, "n1"))
        .await;
    assert_eq!(fake.lists("Pod"), lists, "an ended watch needs no relist");
    assert!(fake.watches("Pod") > watches);

    // 410 Gone: the history is compacted and the source lists again; a
    // pod deleted meanwhile leaves the model.
    fake.expire_watches();
    assert!(fake.delete("Pod", "x", "c"));
    fake.apply(namespace("y"));
    let input = src
        .converged("after 410 Gone", &expected(&fake, "n1"))
        .await;
    assert!(
        input.snapshot.namespaces.contains_key("y"),
        "{:?}",
        input.snapshot.namespaces.keys().collect::<Vec<_>>()
    );
    let health = src
        .health_until("listed again", |h| fake.lists("Pod") > lists && h.synced)
        .await;
    assert_eq!(health.unreachable, None, "a 410 is no outage");

    let metrics = src.metrics.encode();
    for needle in [
        "netpol_watch_events_total{kind=\"Pod\"}",
        "netpol_watch_errors_total{kind=\"Pod\"}",
        "netpol_store_objects{kind=\"Pod\"} 2",
        "netpol_store_objects{kind=\"Node\"} 2",
        "netpol_store_objects{kind=\"ClusterNetworkPolicy\"} 1",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    src.stop().await;
}

#[tokio::test]
async fn nothing_is_published_until_every_store_has_listed() {
    let fake = cluster().await;
    fake.fail_lists("NetworkPolicy", true);
    let mut src = Running::start(&fake, "n1");
    let health = src
        .health_until("every store but NetworkPolicy listed, and it failed", |h| {
            h.stores
                .iter()
                .all(|s| s.ready == (s.kind != "NetworkPolicy"))
                && h.stores
                    .iter()
                    .any(|s| s.kind == "NetworkPolicy" && s.error.is_some())
        })
        .await;
    assert!(!health.synced);
    assert!(
        src.inputs.borrow().is_none(),
        "a half-listed cluster was published"
    );
    fake.fail_lists("NetworkPolicy", false);
    let input = src.converged("all listed", &expected(&fake, "n1")).await;
    assert_eq!(input.snapshot.policies.len(), 1);
    src.health_until("synced and reachable", |h| {
        h.synced && h.unreachable.is_none() && h.stores.iter().all(|s| s.ready)
    })
    .await;
    src.stop().await;
}

#[tokio::test]
async fn api_outage_keeps_the_last_state_and_reports_unreachable_until_it_returns() {
    let fake = cluster().await;
    let mut src = Running::start(&fake, "n1");
    let before = src.converged("initial list", &expected(&fake, "n1")).await;

    fake.set_reachable(false);
    let health = src
        .health_until("unreachable", |h| h.unreachable.is_some())
        .await;
    assert!(health.synced);
    // Changes the source cannot see yet.
    fake.apply(pod("late", "10.0.0.9", "n1"));
    fake.delete("Pod", "x", "b");
    let now = src.inputs.borrow().clone().expect("the last input stays");
    assert_eq!(
        fingerprint_of(&now),
        fingerprint_of(&before),
        "nothing enforced is dropped during an outage"
    );

    fake.set_reachable(true);
    let input = src
        .converged("after the outage", &expected(&fake, "n1"))
        .await;
    assert!(
        input.snapshot.pods.keys().any(|p| p.name == "late"),
        "{:?}",
        input.snapshot.pods.keys().collect::<Vec<_>>()
    );
    src.health_until("reachable again", |h| h.unreachable.is_none())
        .await;
    src.stop().await;
}

/// A cluster without the ClusterNetworkPolicy CRD (its reads answer 404)
/// runs as one without ClusterNetworkPolicies, and one installed later is
/// found by the store's retry; an invalid one is a problem naming it, and
/// the last valid version stays.
#[tokio::test]
async fn a_cluster_without_the_cluster_network_policy_crd_syncs_and_finds_it_later() {
    let fake = cluster().await;
    fake.set_served("ClusterNetworkPolicy", false);
    let mut src = Running::start(&fake, "n1");
    let first = src
        .converged("no CRD", &{
            let mut snap = Snapshot::default();
            let mut report = LoadReport::default();
            for obj in fake.objects() {
                if obj["kind"] != "ClusterNetworkPolicy" {
                    apply_value(&mut snap, obj, "fake", &mut report);
                }
            }
            fingerprint(&snap)
        })
        .await;
    assert!(first.snapshot.cluster_policies.is_empty());
    let health = src.health.borrow().clone();
    assert!(health.unreachable.is_none(), "{health:?}");
    assert!(
        health.stores.iter().all(|s| s.ready && s.error.is_none()),
        "{health:?}"
    );

    // The CRD installed: found by the retry, without a restart.
    fake.set_served("ClusterNetworkPolicy", true);
    let later = src.converged("CRD installed", &expected(&fake, "n1")).await;
    assert_eq!(later.snapshot.cluster_policies.len(), 1);

    // An invalid new version: named, the valid one stays in force.
    let mut bad = cluster_policy("no-ssh-to-nodes", 22);
    bad["spec"]["egress"][0]["to"] = json!([{"domainNames": ["example.com"]}]);
    fake.apply(bad);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let input = src.inputs.borrow().clone().expect("published");
        if input.problems.iter().any(|p| {
            p.contains("no-ssh-to-nodes") && p.contains("domainNames: not supported by netpol")
        }) {
            assert!(
                input.snapshot.cluster_policies["no-ssh-to-nodes"]
                    .in_force
                    .is_some(),
                "the last valid version stays in force"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no problem naming the invalid ClusterNetworkPolicy: {:?}",
            input.problems
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The CRD removed again: its objects go with it, as the API server
    // deletes a CRD's objects.
    fake.set_served("ClusterNetworkPolicy", false);
    fake.end_watches();
    src.health_until("store still ready", |h| h.stores.iter().all(|s| s.ready))
        .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !src
        .inputs
        .borrow()
        .as_ref()
        .is_some_and(|i| i.snapshot.cluster_policies.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ClusterNetworkPolicies of a removed CRD stay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    src.stop().await;
}
