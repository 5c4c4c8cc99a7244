//! The question: a [`Query`] and its parts, parsed from a command line or
//! a batch line.

use std::{fmt, net::IpAddr, str::FromStr};

use netpol_common::protocol;

/// One side of a query: a pod by `namespace/name`, or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `namespace/name`.
    Pod(String),
    /// An address.
    Address(IpAddr),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse() {
            return Ok(Self::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Pod(s.to_owned()))
            }
            _ => Err(format!(
                "{s:?} is neither a pod (namespace/name) nor an address"
            )),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(p) => f.write_str(p),
            Self::Address(a) => write!(f, "{a}"),
        }
    }
}

/// One question: does `src` reach `dst` on `protocol`/`port`?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The client.
    pub src: Target,
    /// The server.
    pub dst: Target,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port (0 for protocols without ports).
    pub port: u16,
    /// 4 or 6: which address of a pod to use (default: the addresses'
    /// family, else IPv4 when both pods have one).
    pub family: Option<u8>,
    /// Through one of the server's Services (a trailing `via-service`):
    /// for a pod reaching itself, the hairpin kube-proxy sends back to it.
    pub via_service: bool,
    /// Judged by the staged view (a trailing `staged`): the policies
    /// annotated `netpol.io/staged` in force, those annotated
    /// `netpol.io/staged-delete` gone, as the programs judge a new
    /// connection beside the enforced verdict.
    pub staged: bool,
}

/// Parses `tcp/80`, `UDP/53`, `sctp/5000`, `icmp`.
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_port(s: &str) -> Result<(u8, u16), String> {
    let (p, port) = match s.split_once('/') {
        Some((p, port)) => (
            p,
            port.parse::<u16>()
                .map_err(|_| format!("{s:?}: {port:?} is not a port"))?,
        ),
        None => (s, 0),
    };
    let proto =
        super::super::parse_protocol(p).ok_or_else(|| format!("{s:?}: unknown protocol {p:?}"))?;
    let needs_port = matches!(proto, protocol::TCP | protocol::UDP | protocol::SCTP);
    if needs_port && !s.contains('/') {
        return Err(format!("{s:?}: give the port, as {p}/PORT"));
    }
    Ok((proto, port))
}

/// Parses a family: `4`, `6`, `ipv4`, `ipv6`.
///
/// # Errors
/// Anything else.
pub fn parse_family(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "4" | "ipv4" | "v4" => Ok(4),
        "6" | "ipv6" | "v6" => Ok(6),
        _ => Err(format!("{s:?} is not a family (4 or 6)")),
    }
}

impl FromStr for Query {
    type Err = String;

    /// `SRC DST PROTO/PORT [4|6] [via-service] [staged]` (a line of
    /// `explain --batch`).
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let staged = words.last() == Some(&"staged");
        if staged {
            words.pop();
        }
        let via_service = words.last() == Some(&"via-service");
        if via_service {
            words.pop();
        }
        let (src, dst, port, family) = match words.as_slice() {
            [src, dst, port] => (src, dst, port, None),
            [src, dst, port, fam] | [src, dst, port, "--family", fam] => {
                (src, dst, port, Some(parse_family(fam)?))
            }
            _ => return Err(format!("{line:?}: expected SRC DST PROTO/PORT [4|6]")),
        };
        let (protocol, port) = parse_port(port)?;
        Ok(Self {
            src: src.parse()?,
            dst: dst.parse()?,
            protocol,
            port,
            family,
            via_service,
            staged,
        })
    }
}
