//! The plugin ↔ agent protocol: one JSON [`Request`] per connection, one
//! line, answered by one [`Reply`] line.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// One attachment of a container to a network, as CNI names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the interface inside the pod.
    pub ifname: String,
}

/// The pod, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID` when the runtime passes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`, when known: a pod recreated under the same name is
    /// another pod.
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the plugin asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A pod's sandbox got its interface: bind it, program it, answer once
    /// the pod's policy is in the kernel (or `timeout_ms` passed).
    Add {
        /// Which attachment.
        attachment: Attachment,
        /// Whose.
        pod: PodRef,
        /// `CNI_NETNS`.
        netns: String,
        /// The host-side interfaces of the main plugin's result (its
        /// entries without a `sandbox`; the bridge is among them and is
        /// not a pod interface).
        host_interfaces: Vec<String>,
        /// The pod's addresses from the main plugin's result.
        ips: Vec<IpAddr>,
        /// How long the agent may take to answer.
        timeout_ms: u64,
    },
    /// The attachment is being torn down: forget it, and the pod's
    /// connections.
    Del {
        /// Which attachment.
        attachment: Attachment,
    },
    /// Is the attachment's pod bound and programmed?
    Check {
        /// Which attachment.
        attachment: Attachment,
    },
    /// Every attachment not listed is gone (`cni.dev/valid-attachments`).
    Gc {
        /// The ones that still exist.
        valid: Vec<Attachment>,
    },
    /// Is the agent ready for ADDs?
    Status,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// Done.
    Ok,
    /// Not done, and why.
    Error {
        /// Names the pod and the reason.
        message: String,
    },
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listened on the socket before the deadline.
    #[error("no agent listening on {socket} (waited {waited_ms} ms): {source}")]
    Unreachable {
        /// The socket.
        socket: String,
        /// How long connecting was tried.
        waited_ms: u64,
        /// The last connect error.
        source: std::io::Error,
    },
    /// The agent took the request but did not answer in time, or the
    /// connection broke.
    #[error("agent on {socket}: {source}")]
    Io {
        /// The socket.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// The agent's answer was not a [`Reply`].
    #[error("agent on {socket} answered {answer:?}: {source}")]
    Garbled {
        /// The socket.
        socket: String,
        /// What it said.
        answer: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

/// How often a refused or missing socket is tried again.
const RECONNECT: Duration = Duration::from_millis(50);

/// Sends `req` to the agent on `socket` and reads its reply, all within
/// `timeout`. A socket nobody listens on yet (an agent starting or being
/// upgraded) is tried again until then.
///
/// # Errors
/// [`CallError`].
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, CallError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let name = socket.display().to_string();
    let io = |source| CallError::Io {
        socket: name.clone(),
        source,
    };
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() + RECONNECT < deadline => {
                let _ = e;
                std::thread::sleep(RECONNECT);
            }
            Err(source) => {
                return Err(CallError::Unreachable {
                    socket: name,
                    waited_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                    source,
                });
            }
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(io)?;
    stream.set_write_timeout(Some(left)).map_err(io)?;
    let mut line = serde_json::to_vec(req)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(answer.trim()).map_err(|source| CallError::Garbled {
        socket: name.clone(),
        answer,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_read_back_as_written() {
        let add = Request::Add {
            attachment: Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: Some("u".into()),
            },
            netns: "/var/run/netns/cni-1".into(),
            host_interfaces: vec!["cni0".into(), "veth1".into()],
            ips: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            timeout_ms: 5,
        };
        let line = serde_json::to_string(&add).unwrap();
        assert!(line.starts_with(r#"{"op":"add","#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), add);
        let err = Reply::Error {
            message: "x".into(),
        };
        let line = serde_json::to_string(&err).unwrap();
        assert_eq!(line, r#"{"result":"error","message":"x"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), err);
    }

    #[test]
    fn a_socket_nobody_listens_on_is_unreachable_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let e = call(
            &dir.path().join("none.sock"),
            &Request::Status,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, CallError::Unreachable { .. }), "{e}");
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "retried until the deadline"
        );
    }

    #[test]
    fn an_agent_that_starts_late_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let p = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(
                serde_json::from_str::<Request>(&line).unwrap(),
                Request::Status
            );
            (&s).write_all(b"{\"result\":\"ok\"}\n").unwrap();
        });
        let r = call(&path, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(r, Reply::Ok);
        server.join().unwrap();
    }
}
