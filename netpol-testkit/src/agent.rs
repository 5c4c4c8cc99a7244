//! The agent on a thread of its own inside a node namespace, and what
//! tests read from it.
use std::{net::SocketAddr, path::Path, time::Duration};

use netpol_agent::{
    Agent, AgentBuilder, AgentError, Counters, Source, Status, StatusHandle, events::Denial,
};

use crate::{
    manifests::Manifests,
    netns::{Netns, setns},
};

/// How long the agent may take to reach a state a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// An agent running on its own thread inside the node namespace.
pub struct Running {
    pub status: StatusHandle,
    /// Its deny events, from its start.
    pub denials: tokio::sync::broadcast::Receiver<Denial>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
    rt: tokio::runtime::Runtime,
}

impl Running {
    pub fn start(node: &Netns, bpffs: &Path, manifests: &Manifests) -> Self {
        Self::start_with(node, bpffs, manifests, |b| b)
    }

    /// [`Self::start`] with more settings.
    pub fn start_with(
        node: &Netns,
        bpffs: &Path,
        manifests: &Manifests,
        configure: impl FnOnce(AgentBuilder) -> AgentBuilder,
    ) -> Self {
        let agent = configure(
            Agent::builder()
                .source(Source::Files(manifests.0.clone()))
                .node_name("n1")
                .bpffs(bpffs)
                .interfaces("nph*")
                // Tests that read the state file give their own folder.
                .state_dir(None)
                .listen(Some("127.0.0.1:0".parse().expect("address"))),
        )
        .build()
        .expect("agent settings");
        let status = agent.status();
        let denials = agent.denials();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ns = node.path();
        let thread = std::thread::spawn(move || {
            setns(&ns).unwrap_or_else(|e| panic!("the node: {e}"));
            // Built after setns: every runtime thread is in the node.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("agent runtime");
            rt.block_on(agent.run(async {
                let _ = rx.await;
            }))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("test runtime");
        Self {
            status,
            denials,
            stop: Some(tx),
            thread: Some(thread),
            rt,
        }
    }

    /// The next deny event within `timeout`.
    pub fn next_denial(&mut self, timeout: Duration) -> Option<Denial> {
        use tokio::sync::broadcast::error::RecvError;
        let denials = &mut self.denials;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                match denials.recv().await {
                    Ok(d) => Some(d),
                    Err(RecvError::Lagged(n)) => panic!("missed {n} deny events"),
                    Err(RecvError::Closed) => None,
                }
            })
            .await
            .ok()
            .flatten()
        })
    }

    pub fn wait(&mut self, what: &str, pred: impl FnMut(&Status) -> bool) -> Status {
        match self.rt.block_on(self.status.wait_for(DEADLINE, pred)) {
            Ok(s) => s,
            Err(last) => panic!("timed out waiting for {what}; status: {last:#?}"),
        }
    }

    /// Waits until the agent enforces exactly what the folder holds.
    pub fn wait_enforced(&mut self, m: &Manifests) -> Status {
        let fp = m.fingerprint();
        self.wait(&format!("fingerprint {fp}"), |s| {
            s.fingerprint.as_deref() == Some(fp.as_str()) && s.last_error.is_none()
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(r) => {
                    if !std::thread::panicking() {
                        r.expect("agent result");
                    }
                }
                Err(p) if !std::thread::panicking() => std::panic::resume_unwind(p),
                Err(_) => {}
            }
        }
    }
}

/// The interface `name` of a status.
pub fn interface<'a>(
    s: &'a Status,
    name: &str,
) -> Option<&'a netpol_agent::status::InterfaceStatus> {
    s.interfaces.iter().find(|i| i.name == name)
}

/// Packets counted with reason `r` (every direction and family).
pub fn count(bpffs: &Path, r: u32) -> u64 {
    let c = Counters::read_pinned(&bpffs.join("netpol")).expect("counters");
    c.entries
        .iter()
        .filter(|e| e.reason == r)
        .map(|e| e.value.packets)
        .sum()
}

/// The whole response (head and body) of one HTTP GET from inside `node`.
pub fn http_get(node: &Netns, addr: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    node.run(|| {
        let mut s = std::net::TcpStream::connect(addr).expect("connecting to the agent");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    })
}
