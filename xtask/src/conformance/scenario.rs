//! The conformance model and scenarios, as `../shared/conformance/FORMAT.md`
//! defines them.
use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_yaml::Value;

/// Transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            "SCTP" => Self::Sctp,
            other => bail!("unknown protocol {other:?}"),
        })
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Address family of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        })
    }
}

/// Whether a probe targets the pod or its ClusterIP Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    Pod,
    Service,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pod => "pod",
            Self::Service => "service",
        })
    }
}

/// One `probes` entry: a truth table for one port, protocol and path.
#[derive(Clone, Debug)]
pub struct Probe {
    pub port: u16,
    pub proto: Proto,
    pub families: Vec<Family>,
    pub via: Via,
    /// (client, server, expected to connect).
    pub cells: Vec<(String, String, bool)>,
}

/// Identity of an object: kind, namespace ("" when cluster-scoped), name.
pub type ObjKey = (String, String, String);

/// One step: deletes, then applies, then probes.
#[derive(Clone, Debug)]
pub struct Step {
    pub delete: Vec<ObjKey>,
    pub apply: Vec<Value>,
    pub probes: Vec<Probe>,
}

/// One scenario file.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub steps: Vec<Step>,
    /// The model it names (`cluster:`, a file of the shared folder), if
    /// any.
    pub cluster: Option<String>,
}

/// The identity of a manifest object.
pub fn key_of(v: &Value) -> Result<ObjKey> {
    let kind = v["kind"]
        .as_str()
        .context("object without kind")?
        .to_owned();
    let md = &v["metadata"];
    let name = md["name"]
        .as_str()
        .context("object without name")?
        .to_owned();
    let ns = md["namespace"].as_str().unwrap_or("").to_owned();
    Ok((kind, ns, name))
}

/// Every document of a multi-document YAML text.
pub fn documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn parse_matrix(text: &str) -> Result<Vec<(String, String, bool)>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("empty matrix")?
        .split_whitespace()
        .skip(1)
        .collect();
    let mut cells = Vec::new();
    for line in lines {
        let mut parts = line.split_whitespace();
        let row = parts.next().context("matrix row without a name")?;
        let marks: Vec<&str> = parts.collect();
        ensure!(
            marks.len() == header.len(),
            "matrix row {row}: {} cells for {} columns",
            marks.len(),
            header.len()
        );
        for (col, mark) in header.iter().zip(marks) {
            let want = match mark {
                "X" => true,
                "." => false,
                other => bail!("matrix row {row}: unknown mark {other:?}"),
            };
            cells.push((row.to_owned(), (*col).to_owned(), want));
        }
    }
    Ok(cells)
}

fn parse_probe(v: &Value) -> Result<Probe> {
    let port = v["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .context("probe port")?;
    let proto = Proto::parse(v["protocol"].as_str().unwrap_or("TCP"))?;
    let families = match v["families"].as_sequence() {
        None => vec![Family::V4, Family::V6],
        Some(seq) => seq
            .iter()
            .map(|f| match f.as_str() {
                Some("ipv4") => Ok(Family::V4),
                Some("ipv6") => Ok(Family::V6),
                other => bail!("unknown family {other:?}"),
            })
            .collect::<Result<_>>()?,
    };
    let via = match v["via"].as_str().unwrap_or("pod") {
        "pod" => Via::Pod,
        "service" => Via::Service,
        other => bail!("unknown via {other:?}"),
    };
    let cells = parse_matrix(v["matrix"].as_str().context("probe without matrix")?)?;
    Ok(Probe {
        port,
        proto,
        families,
        via,
        cells,
    })
}

/// Reads one scenario file.
pub fn load(path: &Path) -> Result<Scenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let name = v["name"]
        .as_str()
        .context("scenario without name")?
        .to_owned();
    let mut steps = Vec::new();
    for (i, s) in v["steps"]
        .as_sequence()
        .context("scenario without steps")?
        .iter()
        .enumerate()
    {
        let ctx = || format!("{}: step {}", path.display(), i + 1);
        let apply = s["apply"].as_sequence().cloned().unwrap_or_default();
        let delete = s["delete"]
            .as_sequence()
            .map(|d| {
                d.iter()
                    .map(|o| {
                        Ok((
                            o["kind"]
                                .as_str()
                                .context("delete without kind")?
                                .to_owned(),
                            o["namespace"].as_str().unwrap_or("").to_owned(),
                            o["name"]
                                .as_str()
                                .context("delete without name")?
                                .to_owned(),
                        ))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()
            .with_context(ctx)?
            .unwrap_or_default();
        let probes = s["probes"]
            .as_sequence()
            .map(|p| p.iter().map(parse_probe).collect::<Result<Vec<_>>>())
            .transpose()
            .with_context(ctx)?
            .unwrap_or_default();
        steps.push(Step {
            delete,
            apply,
            probes,
        });
    }
    Ok(Scenario {
        name,
        steps,
        cluster: v["cluster"].as_str().map(str::to_owned),
    })
}

/// Every `*.yaml` scenario of a folder, by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading scenarios in {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load(p)).collect()
}

/// A pod as the harness builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// `ns/name`.
    pub id: String,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    /// Declared container ports.
    pub ports: Vec<(Proto, u16)>,
}

/// The pod of a Pod object, if it has addresses.
pub fn pod_spec(v: &Value) -> Result<Option<PodSpec>> {
    let (kind, ns, name) = key_of(v)?;
    if kind != "Pod" {
        return Ok(None);
    }
    let mut spec = PodSpec {
        id: format!("{ns}/{name}"),
        v4: None,
        v6: None,
        ports: Vec::new(),
    };
    for ip in v["status"]["podIPs"].as_sequence().into_iter().flatten() {
        match ip["ip"].as_str().map(str::parse::<std::net::IpAddr>) {
            Some(Ok(std::net::IpAddr::V4(a))) => spec.v4 = Some(a),
            Some(Ok(std::net::IpAddr::V6(a))) => spec.v6 = Some(a),
            _ => bail!("{}: bad podIPs entry", spec.id),
        }
    }
    for c in v["spec"]["containers"].as_sequence().into_iter().flatten() {
        for p in c["ports"].as_sequence().into_iter().flatten() {
            let port = p["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .context("containerPort")?;
            let proto = Proto::parse(p["protocol"].as_str().unwrap_or("TCP"))?;
            spec.ports.push((proto, port));
        }
    }
    Ok((spec.v4.is_some() || spec.v6.is_some()).then_some(spec))
}

/// A ClusterIP Service: its addresses, ports and the pods it selects.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub cluster_ips: Vec<std::net::IpAddr>,
    /// (protocol, port, targetPort).
    pub ports: Vec<(Proto, u16, u16)>,
    /// (protocol, nodePort, targetPort) of a NodePort Service.
    pub node_ports: Vec<(Proto, u16, u16)>,
    /// `externalTrafficPolicy: Local`: node ports lead to the node's own
    /// backends only, and keep the client's address.
    pub local_traffic: bool,
    pub selector: BTreeMap<String, String>,
}

pub fn service_spec(v: &Value) -> Result<Option<ServiceSpec>> {
    let (kind, ns, _) = key_of(v)?;
    if kind != "Service" {
        return Ok(None);
    }
    let cluster_ips = v["spec"]["clusterIPs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.as_str()?.parse().ok())
        .collect();
    let mut ports = Vec::new();
    let mut node_ports = Vec::new();
    for p in v["spec"]["ports"].as_sequence().into_iter().flatten() {
        let port = p["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("service port")?;
        let target = p["targetPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(port);
        let proto = Proto::parse(p["protocol"].as_str().unwrap_or("TCP"))?;
        ports.push((proto, port, target));
        if let Some(node_port) = p["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
            node_ports.push((proto, node_port, target));
        }
    }
    let selector = v["spec"]["selector"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect();
    Ok(Some(ServiceSpec {
        namespace: ns,
        cluster_ips,
        ports,
        node_ports,
        local_traffic: v["spec"]["externalTrafficPolicy"].as_str() == Some("Local"),
        selector,
    }))
}

/// Labels of a Pod object.
pub fn labels(v: &Value) -> BTreeMap<String, String> {
    v["metadata"]["labels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_cells_follow_header_columns() {
        let cells = parse_matrix("-   x/a x/b\nx/a  X   .\nx/b  .   X\n").expect("parse");
        assert_eq!(
            cells,
            vec![
                ("x/a".into(), "x/a".into(), true),
                ("x/a".into(), "x/b".into(), false),
                ("x/b".into(), "x/a".into(), false),
                ("x/b".into(), "x/b".into(), true),
            ]
        );
    }

    #[test]
    fn a_row_with_missing_cells_is_an_error() {
        assert!(parse_matrix("- x/a x/b\nx/a X\n").is_err());
    }
}
