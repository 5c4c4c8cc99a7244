//! A node's Services as kube-proxy (iptables mode) writes them.
use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use crate::netns::Netns;

/// One kube-proxy (iptables mode) Service rule: `frontend:port` of
/// `proto` ("tcp", "udp") translated to `backend:target`.
#[derive(Clone, Debug)]
pub struct Dnat {
    pub frontend: IpAddr,
    pub port: u16,
    pub proto: &'static str,
    pub backend: IpAddr,
    pub target: u16,
}

/// Writes the node's nat tables as kube-proxy does: a services chain
/// jumped to from PREROUTING (pods) and OUTPUT (the node), one DNAT
/// per frontend, and the hairpin masquerade of each backend.
pub fn kube_proxy(node: &Netns, rules: &[Dnat]) {
    for (tool, v4) in [("iptables-restore", true), ("ip6tables-restore", false)] {
        let mut r = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
             -A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n",
        );
        let mut backends = Vec::new();
        for d in rules.iter().filter(|d| d.frontend.is_ipv4() == v4) {
            let to = SocketAddr::new(d.backend, d.target);
            r.push_str(&format!(
                "-A KUBE-SERVICES -d {f} -p {p} -m {p} --dport {port} -j DNAT \
                 --to-destination {to}\n",
                f = d.frontend,
                p = d.proto,
                port = d.port,
            ));
            if !backends.contains(&d.backend) {
                backends.push(d.backend);
            }
        }
        let len = if v4 { 32 } else { 128 };
        for b in backends {
            r.push_str(&format!(
                "-A POSTROUTING -s {b}/{len} -d {b}/{len} -j MASQUERADE\n"
            ));
        }
        r.push_str("COMMIT\n");
        restore(&node.name, tool, &r, false).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// `tool` (`iptables-restore`, `ip6tables-restore`) fed `rules` in the
/// namespace `ns`; with `keep`, the tables' other rules stay
/// (`--noflush`).
///
/// # Errors
/// The tool's complaint, with the rules.
pub fn restore(ns: &str, tool: &str, rules: &str, keep: bool) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, tool, "-w"]);
    if keep {
        cmd.arg("--noflush");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {tool}: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(rules.as_bytes())
        .map_err(|e| format!("{tool}: writing rules: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} in {ns} failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
