//! Initial sync, memory and idle CPU of the kube source against the fake
//! API server in this process, serving 10,000 pods and 1,000 policies.
//!
//! `cargo bench -p netpol-agent --bench kube_source` prints the time from
//! the source's start to its first published input, the resident memory
//! (total, and the growth from before the source started: the fake's
//! own objects are the baseline), and the CPU used over 5 idle seconds.
//! Goals: initial sync ≤ 2 s, resident ≤ 150 MiB, idle CPU ≤ 1% of a core.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use netpol_agent::sources::{Input, kube::KubeSource};
use netpol_testkit::fake_apiserver;
use serde_json::{Value, json};
use tokio::sync::watch;

const PODS: usize = 10_000;
const POLICIES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 100;

/// A pod as the API server returns it: managed fields, annotations,
/// probes and conditions the source trims away.
fn pod(i: usize) -> Value {
    let ns = format!("ns-{}", i % NAMESPACES);
    let app = format!("app-{}", i % 500);
    let ip = format!("10.{}.{}.{}", i / 65_536 + 1, (i / 256) % 256, i % 256);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{app}-{i:06}"), "namespace": ns, "uid": format!("uid-{i}"),
            "labels": {"app": app, "pod-template-hash": "5d8f7c9b4", "tier": "backend"},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
                "prometheus.io/scrape": "true"
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("{app}-5d8f7c9b4"), "uid": "rs-uid",
                                 "controller": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "v1", "time": "2025-01-01T00:00:00Z",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                                            "f:spec": {"f:containers": {}}}}]
        },
        "spec": {
            "nodeName": format!("node-{}", i % NODES),
            "containers": [{
                "name": "main", "image": "registry.example.com/team/app:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}
            }],
            "serviceAccountName": "default"
        },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "hostIP": "192.168.0.1",
            "conditions": [{"type": "Ready", "status": "True",
                            "lastTransitionTime": "2025-01-01T00:00:00Z"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0,
                                   "image": "registry.example.com/team/app:1.2.3",
                                   "imageID": "sha256:0123456789abcdef",
                                   "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]
        }
    })
}

fn policy(i: usize) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("policy-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("app-{}", i % 500)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (i + 1) % 500)}}},
                                  {"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                         "ports": [{"port": 8080}, {"port": "http"}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                        "ports": [{"port": 53, "protocol": "UDP"}]}]
        }
    })
}

fn objects() -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": format!("ns-{n}"), "labels": {"team": "a"}}}));
    }
    for n in 0..NODES {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
                        "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.1.{n}")}]}}));
    }
    out.extend((0..PODS).map(pod));
    out.extend((0..POLICIES).map(policy));
    out
}

/// `(resident bytes, CPU seconds)` of this process.
fn usage() -> (u64, f64) {
    netpol_testkit::process::usage(std::process::id())
}

#[expect(clippy::cast_precision_loss, reason = "byte counts are small")]
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let fake = fake_apiserver::FakeApiServer::start().await;
        fake.apply_all(objects());
        // The fixtures' garbage goes back to the system, so that the
        // source's growth is not hidden in freed heap it reuses.
        // SAFETY: malloc_trim only releases free memory.
        unsafe { libc::malloc_trim(0) };
        let (base_rss, _) = usage();
        let url = fake.url().parse().expect("the fake's URL");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("a client");
        let source = KubeSource::new(client, "node-0");
        let (tx, mut rx) = watch::channel::<Option<Arc<Input>>>(None);
        let (stop, stop_rx) = watch::channel(false);
        let start = Instant::now();
        let task = tokio::spawn(source.run(tx, stop_rx));
        let input = rx
            .wait_for(Option::is_some)
            .await
            .expect("the source publishes")
            .clone()
            .expect("an input");
        let sync = start.elapsed();
        assert_eq!(input.snapshot.pods.len(), PODS);
        assert_eq!(input.snapshot.policies.len(), POLICIES);
        drop(input);
        let (rss, cpu0) = usage();
        let idle = Duration::from_secs(5);
        tokio::time::sleep(idle).await;
        let (rss_idle, cpu1) = usage();
        println!(
            "kube source, {PODS} pods / {POLICIES} policies / {NAMESPACES} namespaces: \
             initial sync {:.0} ms (goal 2000)",
            sync.as_secs_f64() * 1e3
        );
        println!(
            "resident {:.1} MiB after sync, {:.1} MiB idle (goal 150); the source's share \
             {:.1} MiB (the fake's objects, {:.1} MiB, are the baseline)",
            mib(rss),
            mib(rss_idle),
            mib(rss_idle.saturating_sub(base_rss)),
            mib(base_rss)
        );
        println!(
            "idle CPU {:.2}% of a core over {idle:?} (goal 1%)",
            (cpu1 - cpu0) / idle.as_secs_f64() * 100.0
        );
        let _ = stop.send(true);
        let _ = task.await;
    });
}
