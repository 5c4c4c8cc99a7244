//! Services the way kube-proxy (iptables mode) does them, in the node
//! netns: DNAT of `clusterIP:port` to the backend pod, and the masquerade
//! it adds when a pod reaches a Service backed by itself (hairpin).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use serde_yaml::Value;

use super::scenario::{self, Family, ObjKey, Proto};

const CHAIN: &str = "NETPOL-CONFORMANCE-SVC";

/// The node netns' Service rules.
pub struct Kube {
    node: String,
}

/// The ClusterIP of the Service fronting pod `ns/name` (`s-<ns>-<name>`).
pub fn cluster_ip(objects: &BTreeMap<ObjKey, Value>, pod: &str, fam: Family) -> Option<IpAddr> {
    let (ns, name) = pod.split_once('/')?;
    let svc = objects.get(&(
        "Service".to_owned(),
        ns.to_owned(),
        format!("s-{ns}-{name}"),
    ))?;
    scenario::service_spec(svc)
        .ok()
        .flatten()?
        .cluster_ips
        .into_iter()
        .find(|ip| ip.is_ipv4() == (fam == Family::V4))
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Sctp => "sctp",
    }
}

impl Kube {
    pub fn new(node: &str) -> Result<Self> {
        Ok(Self {
            node: node.to_owned(),
        })
    }

    fn restore(&self, tool: &str, rules: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, tool, "-w"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {tool} (Debian package iptables)"))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Rewrites the Service rules for the current objects.
    pub fn sync(&self, objects: &BTreeMap<ObjKey, Value>) -> Result<()> {
        for (tool, v4) in [("iptables-restore", true), ("ip6tables-restore", false)] {
            let mut r = String::new();
            writeln!(r, "*nat")?;
            writeln!(r, ":PREROUTING ACCEPT [0:0]")?;
            writeln!(r, ":OUTPUT ACCEPT [0:0]")?;
            writeln!(r, ":POSTROUTING ACCEPT [0:0]")?;
            writeln!(r, ":{CHAIN} - [0:0]")?;
            writeln!(r, "-A PREROUTING -j {CHAIN}")?;
            writeln!(r, "-A OUTPUT -j {CHAIN}")?;
            let mut hairpin = Vec::new();
            for v in objects.values() {
                let Some(svc) = scenario::service_spec(v)? else {
                    continue;
                };
                let pods = super::backends(&svc, objects);
                let Some(pod) = pods.first() else { continue };
                let Some(spec) = scenario::pod_spec(pod)? else {
                    continue;
                };
                let backend = if v4 {
                    spec.v4.map(IpAddr::V4)
                } else {
                    spec.v6.map(IpAddr::V6)
                };
                let Some(backend) = backend else { continue };
                for ip in svc.cluster_ips.iter().filter(|ip| ip.is_ipv4() == v4) {
                    for (proto, port, target) in &svc.ports {
                        let to = if v4 {
                            format!("{backend}:{target}")
                        } else {
                            format!("[{backend}]:{target}")
                        };
                        writeln!(
                            r,
                            "-A {CHAIN} -d {ip} -p {p} -m {p} --dport {port} -j DNAT --to-destination {to}",
                            p = proto_name(*proto)
                        )?;
                    }
                }
                hairpin.push(backend);
            }
            for b in hairpin {
                let len = if v4 { 32 } else { 128 };
                writeln!(r, "-A POSTROUTING -s {b}/{len} -d {b}/{len} -j MASQUERADE")?;
            }
            writeln!(r, "COMMIT")?;
            self.restore(tool, &r)?;
        }
        Ok(())
    }
}
