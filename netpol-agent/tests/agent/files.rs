//! The files source as the agent runs it: a watched folder whose writes,
//! edits and deletions reach the model, with broken files named and
//! skipped and invalid policies kept at their last valid version.
use std::{path::PathBuf, sync::Arc, time::Duration};

use netpol_agent::{
    model::ObjectRef,
    sources::{Input, files::FilesSource},
};
use tokio::sync::watch;

struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("netpol-agent-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating the folder");
        Self(p)
    }

    /// Writes atomically (temporary file, then rename), as deploy tools do.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("writing");
        std::fs::rename(&tmp, self.0.join(name)).expect("renaming");
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).expect("removing");
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const NS: &str = "{apiVersion: v1, kind: Namespace, metadata: {name: x}}\n";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: x, labels: {{app: {name}}}}}, \
         spec: {{nodeName: n1}}, status: {{phase: Running, podIP: \"{ip}\"}}}}\n"
    )
}

fn policy(port: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\n\
         spec: {{podSelector: {{}}, ingress: [{{ports: [{port}]}}]}}\n"
    )
}

struct Watched {
    rx: watch::Receiver<Option<Arc<Input>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), netpol_agent::sources::files::FilesError>>,
}

impl Watched {
    fn start(dir: &Folder) -> Self {
        let (tx, rx) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(FilesSource::new(&dir.0).run(tx, stop_rx));
        Self { rx, stop, task }
    }

    /// The first input that satisfies `pred`, within a deadline.
    async fn until(&mut self, what: &str, mut pred: impl FnMut(&Input) -> bool) -> Arc<Input> {
        let found = match tokio::time::timeout(
            Duration::from_secs(10),
            self.rx.wait_for(|i| i.as_deref().is_some_and(&mut pred)),
        )
        .await
        {
            Ok(Ok(i)) => i.clone(),
            _ => None,
        };
        found.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; last input: {:?}",
                self.rx.borrow()
            )
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("source task")
            .expect("source result");
    }
}

#[tokio::test]
async fn model_follows_writes_edits_and_deletions() {
    let dir = Folder::new("follow");
    dir.write("ns.yaml", NS);
    let mut w = Watched::start(&dir);
    w.until("the namespace", |i| i.snapshot.namespaces.contains_key("x"))
        .await;

    dir.write("a.yaml", &pod("a", "10.0.0.1"));
    let a = ObjectRef::new("x", "a");
    w.until("pod a", |i| i.snapshot.pods.contains_key(&a)).await;

    dir.write("a.yaml", &pod("a", "10.0.0.9"));
    w.until("pod a's new address", |i| {
        i.snapshot
            .pods
            .get(&a)
            .is_some_and(|p| p.ips == ["10.0.0.9".parse::<std::net::IpAddr>().expect("ip")])
    })
    .await;

    dir.remove("a.yaml");
    let input = w
        .until("pod a gone", |i| !i.snapshot.pods.contains_key(&a))
        .await;
    assert!(
        input.snapshot.namespaces.contains_key("x"),
        "other files stay"
    );
    w.stop().await;
}

#[tokio::test]
async fn broken_file_is_reported_by_name_and_skipped() {
    let dir = Folder::new("broken");
    dir.write("ns.yaml", NS);
    dir.write("a.yaml", &pod("a", "10.0.0.1"));
    let mut w = Watched::start(&dir);
    let a = ObjectRef::new("x", "a");
    w.until("pod a", |i| i.snapshot.pods.contains_key(&a)).await;

    dir.write("b.yaml", "kind: [this is not yaml\n");
    dir.write("c.yaml", &pod("c", "10.0.0.3"));
    let c = ObjectRef::new("x", "c");
    let input = w
        .until("pod c and the problem with b.yaml", |i| {
            i.snapshot.pods.contains_key(&c) && i.problems.iter().any(|p| p.contains("b.yaml"))
        })
        .await;
    assert!(
        input.snapshot.pods.contains_key(&a),
        "the good files still apply"
    );
    assert_eq!(input.problems.len(), 1, "{:?}", input.problems);

    dir.write("b.yaml", &pod("b", "10.0.0.2"));
    let b = ObjectRef::new("x", "b");
    let input = w
        .until("b.yaml fixed", |i| i.snapshot.pods.contains_key(&b))
        .await;
    assert!(input.problems.is_empty(), "{:?}", input.problems);
    w.stop().await;
}

#[tokio::test]
async fn policy_that_becomes_invalid_keeps_its_last_valid_version() {
    let dir = Folder::new("invalid");
    dir.write("ns.yaml", NS);
    dir.write("p.yaml", &policy("{port: 80}"));
    let mut w = Watched::start(&dir);
    let p = ObjectRef::new("x", "p");
    let first = w
        .until("policy p", |i| {
            i.snapshot
                .policies
                .get(&p)
                .is_some_and(|s| s.in_force.is_some())
        })
        .await;
    let valid = first.snapshot.policies[&p].in_force.clone();

    dir.write("p.yaml", &policy("{port: 80, endPort: 20}"));
    let input = w
        .until("policy p's errors", |i| {
            i.snapshot
                .policies
                .get(&p)
                .is_some_and(|s| !s.errors.is_empty())
        })
        .await;
    assert_eq!(
        input.snapshot.policies[&p].in_force, valid,
        "the last valid version stays in force"
    );
    assert!(
        input
            .problems
            .iter()
            .any(|m| m.contains("p.yaml") && m.contains("endPort")),
        "{:?}",
        input.problems
    );

    dir.write("p.yaml", &policy("{port: 443}"));
    let input = w
        .until("policy p valid again", |i| {
            i.snapshot
                .policies
                .get(&p)
                .is_some_and(|s| s.errors.is_empty() && s.in_force != valid)
        })
        .await;
    assert!(input.problems.is_empty(), "{:?}", input.problems);
    w.stop().await;
}
