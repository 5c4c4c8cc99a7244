//! Echo servers (TCP: every line of a connection; UDP: every datagram)
//! and the probes that talk to them. A policy that denies drops the SYN,
//! so a denial shows as a timeout, never a refusal.
use std::{
    fmt::Display,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    time::Duration,
};

use crate::{
    netns::{Netns, setns},
    topology::Pod,
};

/// A probe that must fail waits this long.
pub const FAST: Duration = Duration::from_millis(1500);
/// A probe that must succeed gets a retry this long (neighbour discovery
/// on fresh links, a loaded machine).
pub const SLOW: Duration = Duration::from_secs(3);

fn ip(addr: impl Display) -> IpAddr {
    let text = addr.to_string();
    text.parse()
        .unwrap_or_else(|e| panic!("address {text:?}: {e}"))
}

/// Echo servers on `port` of every address of the pod, for as long as the
/// test runs.
pub fn echo(pod: &Pod, port: u16) {
    serve(&pod.ns, &pod.addresses(), port);
}

/// How long a served connection may stay silent before the server lets it
/// go. Long: a test may hold a connection idle across an agent restart and
/// probes that wait out timeouts; in an emulated 5.10 VM, busy with other
/// tests, that passed the 30 s this once was and the server, not the
/// programs, closed the held connection.
const IDLE: Duration = Duration::from_secs(600);

/// TCP and UDP echo servers on `port` of each of `addresses` in `ns` (a
/// pod's, a node's own), for as long as the test runs.
pub fn serve(ns: &Netns, addresses: &[impl Display], port: u16) {
    for addr in addresses {
        let at = SocketAddr::new(ip(addr), port);
        let (tcp, udp) = ns.run(|| {
            (
                TcpListener::bind(at).expect("tcp bind"),
                UdpSocket::bind(at).expect("udp bind"),
            )
        });
        std::thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(IDLE));
                    lines(&s);
                });
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        });
    }
}

/// Sends back each line read from `s` until the peer closes it, a read
/// times out or a write fails.
pub fn lines(s: &TcpStream) {
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if (&*s).write_all(line.as_bytes()).is_err() {
            break;
        }
        line.clear();
    }
}

/// Whether a connection from `from` to `to:port` exchanges a line. A
/// denied connection waits out `connect_timeout`: the caller picks it
/// long enough for an allowed one to resolve its neighbour first.
pub fn connects(from: &Netns, to: impl Display, port: u16, connect_timeout: Duration) -> bool {
    let dst = SocketAddr::new(ip(to), port);
    from.run(|| {
        TcpStream::connect_timeout(&dst, connect_timeout)
            .is_ok_and(|s| exchange(&s, "hi\n", Duration::from_secs(2)))
    })
}

/// One line out and the same line back on an open connection, within
/// `timeout`.
pub fn exchange(s: &TcpStream, line: &str, timeout: Duration) -> bool {
    let _ = s.set_read_timeout(Some(timeout));
    if (&*s).write_all(line.as_bytes()).is_err() {
        return false;
    }
    let mut back = String::new();
    BufReader::new(s).read_line(&mut back).is_ok() && back == line
}

/// One echo request from `from` and its reply within two seconds.
pub fn pings(from: &Netns, to: impl Display) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &from.name, "ping", "-c1", "-W2"])
        .arg(to.to_string())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One exchange with an echo server from the calling thread's netns.
pub fn echoes(proto: Proto, dst: SocketAddr, timeout: Duration) -> bool {
    const LINE: &str = "netpol-probe\n";
    match proto {
        Proto::Tcp => {
            TcpStream::connect_timeout(&dst, timeout).is_ok_and(|s| exchange(&s, LINE, timeout))
        }
        Proto::Udp => {
            let any: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let Ok(s) = UdpSocket::bind(any) else {
                return false;
            };
            if s.connect(dst).is_err()
                || s.set_read_timeout(Some(timeout)).is_err()
                || s.send(LINE.as_bytes()).is_err()
            {
                return false;
            }
            let mut buf = [0u8; 64];
            matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == LINE.as_bytes())
        }
    }
}

/// A probe: what it tries (from the thread's netns, with a timeout),
/// whether it must succeed, and how to name it.
pub struct Case {
    pub what: String,
    pub from: String,
    pub want: bool,
    pub run: Box<dyn Fn(Duration) -> bool + Send + Sync>,
}

impl Case {
    pub fn new(
        what: impl Into<String>,
        from: &Netns,
        want: bool,
        run: impl Fn(Duration) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            what: what.into(),
            from: from.name.clone(),
            want,
            run: Box::new(run),
        }
    }

    /// An echo exchange from `from` with `dst`.
    pub fn echo(from: &Netns, proto: Proto, dst: SocketAddr, want: bool) -> Self {
        Self::new(format!("{proto:?} {dst}"), from, want, move |t| {
            echoes(proto, dst, t)
        })
    }
}

/// Runs every case in parallel, each inside its client's netns; a case
/// that must fail gets [`FAST`], one that must succeed a retry of
/// [`SLOW`]. Returns one line per case that differs.
pub fn differing(cases: Vec<Case>) -> Vec<String> {
    let handles: Vec<_> = cases
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let entered = setns(&Netns::path_of(&c.from)).is_ok();
                let got = entered && ((c.run)(FAST) || (c.want && (c.run)(SLOW)));
                (got != c.want).then(|| {
                    format!(
                        "{}: expected {}, got {}",
                        c.what,
                        if c.want { "success" } else { "failure" },
                        if got { "success" } else { "failure" }
                    )
                })
            })
        })
        .collect();
    let mut out: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().expect("probe thread"))
        .collect();
    out.sort();
    out
}

/// Asserts that every case behaves as wanted, naming those that do not.
pub fn expect(step: &str, cases: Vec<Case>) {
    let bad = differing(cases);
    assert!(bad.is_empty(), "{step}:\n  {}", bad.join("\n  "));
}

/// A TCP connection opened from inside `from`.
pub fn connect(from: &Netns, dst: SocketAddr) -> TcpStream {
    from.run(|| {
        TcpStream::connect_timeout(&dst, SLOW)
            .unwrap_or_else(|e| panic!("connecting to {dst}: {e}"))
    })
}
