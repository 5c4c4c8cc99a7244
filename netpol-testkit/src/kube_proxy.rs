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
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.name, tool, "-w"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(r.as_bytes())
            .expect("writing rules");
        let out = child.wait_with_output().expect("waiting for the rules");
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{r}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
