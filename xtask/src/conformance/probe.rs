//! Servers in the pods and the probes that test them: TCP (connect and
//! exchange a line), UDP (a datagram and its echo) and SCTP (an INIT on a
//! raw socket answered by an INIT-ACK from a raw-socket responder, since
//! this kernel has no SCTP).
use std::{
    cell::RefCell,
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::scenario::{PodSpec, Proto};

const IPPROTO_SCTP: i32 = 132;

thread_local! {
    /// The netns this thread is in (by the address of its handle), so a
    /// worker enters a pod's netns only when it changes.
    static CURRENT: RefCell<usize> = const { RefCell::new(0) };
}

/// Moves the calling thread into a network namespace.
pub fn enter(fd: &Arc<File>) -> Result<()> {
    let id = Arc::as_ptr(fd) as usize;
    if CURRENT.with(|c| *c.borrow() == id) {
        return Ok(());
    }
    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    CURRENT.with(|c| *c.borrow_mut() = id);
    Ok(())
}

/// Starts the pod's servers: TCP and UDP echo on every declared port of
/// every address, and one SCTP responder per family. They live as long as
/// the process (their sockets keep nothing else alive: the netns goes when
/// the harness deletes it).
pub fn start_servers(fd: &Arc<File>, pod: &PodSpec) -> Result<()> {
    let (tx, rx) = mpsc::channel::<Result<()>>();
    let fd = fd.clone();
    let pod = pod.clone();
    std::thread::spawn(move || {
        let r = (|| -> Result<()> {
            enter(&fd)?;
            let addrs: Vec<IpAddr> = pod
                .v4
                .map(IpAddr::V4)
                .into_iter()
                .chain(pod.v6.map(IpAddr::V6))
                .collect();
            for addr in &addrs {
                for &(proto, port) in &pod.ports {
                    let sa = SocketAddr::new(*addr, port);
                    match proto {
                        Proto::Tcp => {
                            let l = TcpListener::bind(sa)
                                .with_context(|| format!("{}: tcp {sa}", pod.id))?;
                            std::thread::spawn(move || serve_tcp(&l));
                        }
                        Proto::Udp => {
                            let s = UdpSocket::bind(sa)
                                .with_context(|| format!("{}: udp {sa}", pod.id))?;
                            std::thread::spawn(move || serve_udp(&s));
                        }
                        Proto::Sctp => {}
                    }
                }
            }
            let sctp: Vec<u16> = pod
                .ports
                .iter()
                .filter(|(p, _)| *p == Proto::Sctp)
                .map(|(_, port)| *port)
                .collect();
            if !sctp.is_empty() {
                // One responder per address, bound to it: its INIT-ACK
                // leaves from the address the INIT was sent to. Unbound,
                // the kernel picks the route's source (a host-networked
                // pod's node answers a local pod from its bridge address),
                // and the prober rightly ignores it.
                for addr in &addrs {
                    let v6 = addr.is_ipv6();
                    let sock = raw_sctp(v6)?;
                    sock.bind(&SocketAddr::new(*addr, 0).into())
                        .with_context(|| format!("{}: sctp responder on {addr}", pod.id))?;
                    let ports = sctp.clone();
                    std::thread::spawn(move || serve_sctp(&sock, v6, &ports));
                }
            }
            Ok(())
        })();
        let _ = tx.send(r);
    });
    rx.recv().context("server thread")?
}

fn serve_tcp(l: &TcpListener) {
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            if BufReader::new(&s).read_line(&mut line).is_ok() {
                let _ = (&s).write_all(line.as_bytes());
            }
        });
    }
}

fn serve_udp(s: &UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        let _ = s.send_to(&buf[..n], from);
    }
}

/// A raw IP socket for SCTP (protocol 132) in the current netns.
fn raw_sctp(v6: bool) -> Result<socket2::Socket> {
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    socket2::Socket::new(
        domain,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(IPPROTO_SCTP)),
    )
    .context("raw SCTP socket (needs root)")
}

/// CRC32c (Castagnoli), SCTP's checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP packet with one INIT (type 1) or INIT-ACK (type 2) chunk.
fn sctp_packet(sport: u16, dport: u16, vtag: u32, chunk: u8, initiate_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[chunk, 0, 0, 20]);
    p.extend_from_slice(&initiate_tag.to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&initiate_tag.to_be_bytes()); // initial TSN
    // The checksum is stored little-endian (RFC 4960, appendix B).
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// The SCTP header and first chunk of a received datagram: IPv4 raw
/// sockets deliver the IP header, IPv6 ones do not.
fn sctp_of(buf: &[u8], v6: bool) -> Option<(u16, u16, u32, u8, u32)> {
    let off = if v6 {
        0
    } else {
        usize::from(buf.first()? & 0x0f) * 4
    };
    let s = buf.get(off..off + 20)?;
    Some((
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u32::from_be_bytes([s[4], s[5], s[6], s[7]]),
        s[12],
        u32::from_be_bytes([s[16], s[17], s[18], s[19]]),
    ))
}

fn recv_from(sock: &socket2::Socket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    // SAFETY: MaybeUninit<u8> has the layout of u8; recv_from only writes
    // initialised bytes into the buffer and reports how many.
    let uninit: &mut [MaybeUninit<u8>] =
        unsafe { &mut *(std::ptr::from_mut(buf) as *mut [MaybeUninit<u8>]) };
    let (n, addr) = sock.recv_from(uninit).ok()?;
    Some((n, addr.as_socket()?))
}

fn serve_sctp(sock: &socket2::Socket, v6: bool, ports: &[u16]) {
    let mut buf = [0u8; 2048];
    while let Some((n, from)) = recv_from(sock, &mut buf) {
        let Some((sport, dport, _, chunk, tag)) = sctp_of(&buf[..n], v6) else {
            continue;
        };
        if chunk != 1 || !ports.contains(&dport) {
            continue;
        }
        let reply = sctp_packet(dport, sport, tag, 2, tag ^ 0x5a5a_5a5a);
        let to = SocketAddr::new(from.ip(), 0);
        let _ = sock.send_to(&reply, &to.into());
    }
}

/// One connection attempt from the current netns; `true` when it
/// succeeded within `timeout`.
pub fn probe(proto: Proto, dst: SocketAddr, timeout: Duration) -> bool {
    match proto {
        Proto::Tcp => probe_tcp(dst, timeout),
        Proto::Udp => probe_udp(dst, timeout),
        Proto::Sctp => probe_sctp(dst, timeout),
    }
}

fn probe_tcp(dst: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = TcpStream::connect_timeout(&dst, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    if (&s).write_all(b"netpol-probe\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).is_ok() && line == "netpol-probe\n"
}

/// The next client port of a UDP or SCTP probe: taken in turn from
/// 20000..60000, so a probe never reuses the 5-tuple of a recent one. A
/// reused one would find the earlier probe's conntrack entry and pass as
/// tracked, unjudged: neither the new-connection verdict nor the staged
/// view's report the run checks. (TCP's own port choice already avoids
/// recent tuples.)
fn next_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The process id spreads concurrent runs apart.
    let at = (n + std::process::id()) % 40_000;
    20_000 + u16::try_from(at).unwrap_or(0)
}

fn probe_udp(dst: SocketAddr, timeout: Duration) -> bool {
    let ip: IpAddr = if dst.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    // A port in use (a concurrent probe's) is skipped.
    let Some(s) = (0..8).find_map(|_| UdpSocket::bind(SocketAddr::new(ip, next_port())).ok())
    else {
        return false;
    };
    if s.connect(dst).is_err() || s.set_read_timeout(Some(timeout)).is_err() {
        return false;
    }
    let msg = b"netpol-probe";
    if s.send(msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == msg)
}

fn probe_sctp(dst: SocketAddr, timeout: Duration) -> bool {
    let v6 = dst.is_ipv6();
    let Ok(sock) = raw_sctp(v6) else {
        return false;
    };
    // A source port and tag of our own: other probes in this netns see our
    // INIT-ACKs too, and we theirs.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ (std::process::id() << 8)
        ^ u32::from(dst.port());
    let sport = next_port();
    let tag = nonce | 1;
    let init = sctp_packet(sport, dst.port(), 0, 1, tag);
    if sock
        .send_to(&init, &SocketAddr::new(dst.ip(), 0).into())
        .is_err()
    {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let Some((n, from)) = recv_from(&sock, &mut buf) else {
            return false;
        };
        if from.ip() != dst.ip() {
            continue;
        }
        if let Some((s, d, vtag, chunk, _)) = sctp_of(&buf[..n], v6)
            && chunk == 2
            && s == dst.port()
            && d == sport
            && vtag == tag
        {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_3720_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn init_ack_reply_carries_the_init_tag_as_verification_tag() {
        let init = sctp_packet(1000, 80, 0, 1, 0xabcd);
        let (s, d, vtag, chunk, tag) = sctp_of(&init, true).expect("parse");
        assert_eq!((s, d, vtag, chunk, tag), (1000, 80, 0, 1, 0xabcd));
        let ack = sctp_packet(80, 1000, tag, 2, 7);
        assert_eq!(sctp_of(&ack, true).map(|h| h.2), Some(0xabcd));
    }
}
