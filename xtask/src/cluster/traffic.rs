//! Traffic that runs while the cluster's agents are replaced: servers that
//! count what reaches them by source, probers that keep connecting, and
//! long-lived connections that keep exchanging lines. What a test asserts
//! of them is counted on both ends: a denied packet delivered is one the
//! server saw, not one the client guessed at.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::conformance::probe::enter;

/// The rolling upgrade's servers' port, TCP and UDP (the outage's is the
/// next: a server lives as long as the process).
pub const PORT: u16 = 9000;
/// A probe's allowance: generous, so a busy 2-core machine does not turn
/// a slow answer into a failure.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Between two probes of one pair.
const EVERY: Duration = Duration::from_millis(20);

/// What reached a server, by source address: TCP connections accepted
/// plus UDP datagrams received.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<BTreeMap<IpAddr, u64>>>);

impl Seen {
    fn add(&self, from: IpAddr) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(from).or_default() += 1;
        }
    }

    /// How often `from` reached the server.
    pub fn from(&self, from: IpAddr) -> u64 {
        self.0
            .lock()
            .map_or(0, |m| m.get(&from).copied().unwrap_or(0))
    }
}

/// Counting echo servers (TCP lines, UDP datagrams) on `port` of each of
/// `addrs`, in the namespace of `fd`; listening when this returns.
pub fn serve(fd: &Arc<File>, addrs: &[IpAddr], port: u16) -> Result<Seen> {
    let seen = Seen::default();
    for &addr in addrs {
        let at = SocketAddr::new(addr, port);
        let (tx, rx) = std::sync::mpsc::channel();
        let (fd, seen_tcp) = (fd.clone(), seen.clone());
        std::thread::spawn(move || {
            let bound = enter(&fd).and_then(|()| {
                Ok((
                    TcpListener::bind(at).with_context(|| format!("tcp {at}"))?,
                    UdpSocket::bind(at).with_context(|| format!("udp {at}"))?,
                ))
            });
            let (tcp, udp) = match bound {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            let seen_udp = seen_tcp.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    seen_udp.add(from.ip());
                    let _ = udp.send_to(&buf[..n], from);
                }
            });
            for s in tcp.incoming().flatten() {
                if let Ok(peer) = s.peer_addr() {
                    seen_tcp.add(peer.ip());
                }
                std::thread::spawn(move || netpol_testkit::echo::lines(&s));
            }
        });
        rx.recv().context("a server thread")??;
    }
    Ok(seen)
}

/// One TCP exchange, then one UDP exchange, from the calling thread's
/// namespace: (TCP answered, UDP answered).
fn once(dst: SocketAddr) -> (bool, bool) {
    let tcp = TcpStream::connect_timeout(&dst, TIMEOUT)
        .is_ok_and(|s| netpol_testkit::echo::exchange(&s, "probe\n", TIMEOUT));
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let udp = UdpSocket::bind(any).is_ok_and(|s| {
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(TIMEOUT)).is_ok()
            && s.send_to(b"probe", dst).is_ok()
            && s.recv_from(&mut buf)
                .is_ok_and(|(n, _)| &buf[..n] == b"probe")
    });
    (tcp, udp)
}

/// Answers and silences of one prober.
#[derive(Default)]
pub struct Counts {
    pub answered: AtomicU64,
    pub silent: AtomicU64,
    /// When each unanswered probe was sent, and its protocol.
    pub silences: Mutex<Vec<(std::time::Instant, &'static str)>>,
}

/// A prober: TCP then UDP to `dst` from the namespace of `fd`, every
/// [`EVERY`], until `stop`.
pub fn prober(
    fd: &Arc<File>,
    dst: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> (Arc<Counts>, JoinHandle<()>) {
    let counts = Arc::new(Counts::default());
    let (fd, stop, c) = (fd.clone(), stop.clone(), counts.clone());
    let handle = std::thread::spawn(move || {
        if enter(&fd).is_err() {
            c.silent.fetch_add(1, Ordering::Relaxed);
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            let at = std::time::Instant::now();
            let (tcp, udp) = once(dst);
            for (ok, proto) in [(tcp, "TCP"), (udp, "UDP")] {
                if ok {
                    c.answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.silent.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut v) = c.silences.lock() {
                        v.push((at, proto));
                    }
                }
            }
            std::thread::sleep(EVERY);
        }
    });
    (counts, handle)
}

/// A connection held open from the namespace of `fd` to `dst`, a line
/// echoed every 100 ms until `stop`; the thread returns how many lines
/// went back and forth, or the first failure.
pub fn long_lived(
    fd: &Arc<File>,
    dst: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Result<JoinHandle<Result<u64, String>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (fd, stop) = (fd.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        let s = match enter(&fd).and_then(|()| Ok(TcpStream::connect_timeout(&dst, TIMEOUT)?)) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return Err("not connected".to_owned());
            }
        };
        let _ = tx.send(Ok(()));
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut lines = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let line = format!("line {lines}\n");
            (&s).write_all(line.as_bytes())
                .map_err(|e| format!("after {lines} lines: writing: {e}"))?;
            let mut back = String::new();
            reader
                .read_line(&mut back)
                .map_err(|e| format!("after {lines} lines: reading: {e}"))?;
            if back != line {
                return Err(format!(
                    "after {lines} lines: the connection ended ({back:?})"
                ));
            }
            lines += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(lines)
    });
    rx.recv()
        .context("a connection thread")?
        .with_context(|| format!("connecting to {dst}"))?;
    Ok(handle)
}

/// Whether a TCP line echoes from the namespace of `fd` to `dst`.
pub fn reaches(fd: &Arc<File>, dst: SocketAddr, timeout: Duration) -> bool {
    echoes(fd, netpol_testkit::echo::Proto::Tcp, dst, timeout)
}

/// Whether one `proto` exchange with the echo server at `dst` succeeds
/// from the namespace of `fd`.
pub fn echoes(
    fd: &Arc<File>,
    proto: netpol_testkit::echo::Proto,
    dst: SocketAddr,
    timeout: Duration,
) -> bool {
    std::thread::scope(|s| {
        s.spawn(|| enter(fd).is_ok() && netpol_testkit::echo::echoes(proto, dst, timeout))
            .join()
            .unwrap_or(false)
    })
}
