//! A CNI chain run as containerd runs one: the conflist's plugins in order
//! (in reverse for DEL), each given the previous one's result as
//! `prevResult`, with the CNI variables and `CNI_ARGS` containerd sets.
//! The plugins are Debian's (`/usr/lib/cni`: `bridge` with dual-stack
//! `host-local`, `portmap`), as flannel delegates to them, then
//! `netpol-cni`.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::netns::Netns;

/// k3s's flannel conflist as k3s writes it at every start (its template),
/// for the installer's tests.
pub const K3S_FLANNEL_CONFLIST: &str = r#"{
  "name":"cbr0",
  "cniVersion":"1.0.0",
  "plugins":[
    {
      "type":"flannel",
      "delegate":{
        "hairpinMode":true,
        "forceAddress":true,
        "isDefaultGateway":true
      }
    },
    {
      "type":"portmap",
      "capabilities":{
        "portMappings":true
      }
    },
    {
      "type":"bandwidth",
      "capabilities":{
        "bandwidth":true
      }
    }
  ]
}
"#;

/// Where Debian's containernetworking-plugins puts the plugins.
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// A conflist and the folders its plugins are found in.
pub struct Chain {
    /// The conflist.
    pub conflist: Value,
    /// `CNI_PATH`.
    pub path: Vec<PathBuf>,
    /// Run the plugins as the runtime does, from a thread in the node's
    /// namespace, rather than through `ip netns exec` (which also mounts
    /// the namespace's own /sys, a few milliseconds per plugin): timing
    /// then measures the plugins alone. Their /sys is then the host's.
    pub direct: bool,
}

impl Chain {
    /// flannel's chain on a node: `bridge` on `cni0` (gateway, hairpin,
    /// `host-local` over `v4` and `v6`, leases in `data_dir`), `portmap`,
    /// then `netpol-cni` (`plugin`) talking to `socket`.
    #[must_use]
    pub fn flannel_like(plugin: &Path, socket: &Path, data_dir: &Path, v4: &str, v6: &str) -> Self {
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": data_dir,
                        "ranges": [[{ "subnet": v4 }], [{ "subnet": v6 }]],
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
                netpol_cni_entry(socket),
            ],
        });
        Self {
            conflist,
            path: vec![
                plugin.parent().expect("plugin folder").to_owned(),
                PathBuf::from(DEBIAN_PLUGINS),
            ],
            direct: false,
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// ADD through the whole chain; the last result, or the first failure
    /// (`plugin: output`).
    ///
    /// # Errors
    /// The failing plugin's output.
    pub fn add(&self, node: &Netns, pod: &Netns, sandbox: &Sandbox) -> Result<Value, String> {
        let mut prev: Option<Value> = None;
        for p in self.plugins() {
            prev = Some(self.exec(node, pod, sandbox, "ADD", &p, prev.as_ref())?);
        }
        prev.ok_or_else(|| "empty chain".into())
    }

    /// DEL through the chain in reverse, each plugin given `result` (the
    /// cached ADD result, as CNI 1.0 runtimes pass it); every plugin runs
    /// even when one fails, as containerd does.
    ///
    /// # Errors
    /// The failures, joined.
    pub fn del(
        &self,
        node: &Netns,
        pod: &Netns,
        sandbox: &Sandbox,
        result: Option<&Value>,
    ) -> Result<(), String> {
        let mut errors = Vec::new();
        for p in self.plugins().iter().rev() {
            if let Err(e) = self.exec(node, pod, sandbox, "DEL", p, result) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// One plugin, run inside the node's namespace as the runtime runs it.
    ///
    /// # Errors
    /// Its output when it fails.
    pub fn exec(
        &self,
        node: &Netns,
        pod: &Netns,
        sandbox: &Sandbox,
        command: &str,
        plugin: &Value,
        prev: Option<&Value>,
    ) -> Result<Value, String> {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        if !sandbox.ips.is_empty() && plugin["capabilities"]["ips"] == true {
            conf["runtimeConfig"] = json!({ "ips": sandbox.ips });
        }
        let ty = plugin["type"].as_str().unwrap_or_default().to_owned();
        let bin = self
            .path
            .iter()
            .map(|d| d.join(&ty))
            .find(|p| p.exists())
            .ok_or_else(|| format!("{ty}: not in {:?}", self.path))?;
        let path = self
            .path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut cmd = if self.direct {
            Command::new(&bin)
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &node.name]).arg(&bin);
            c
        };
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", path)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    sandbox.namespace, sandbox.name, sandbox.container_id, sandbox.uid
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A child takes the namespace of the thread that forks it.
        let mut child = if self.direct {
            node.run(|| cmd.spawn())
        } else {
            cmd.spawn()
        }
        .map_err(|e| format!("{ty}: {e}"))?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| format!("{ty}: writing its config: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("{ty}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "{ty} {command}: {} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if stdout.trim().is_empty() {
            return Ok(prev.cloned().unwrap_or(Value::Null));
        }
        serde_json::from_str(&stdout).map_err(|e| format!("{ty} {command}: {e}: {stdout}"))
    }
}

/// `netpol-cni`'s entry for `socket`, as the installer writes it.
#[must_use]
pub fn netpol_cni_entry(socket: &Path) -> Value {
    json!({ "type": "netpol-cni", "socket": socket, "timeoutMs": 5000 })
}

/// A pod's sandbox as the runtime names it.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    /// Addresses the pod asks for (CIDR notation), handed to the plugins
    /// that declare the `ips` capability as `runtimeConfig.ips`, as the
    /// runtime does; empty: `host-local` picks.
    pub ips: Vec<String>,
}

impl Sandbox {
    /// The sandbox of pod `namespace/name` with uid `uid-<name>`.
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            container_id: crate::netns::unique(&format!("ctr-{name}-")),
            ips: Vec::new(),
        }
    }
}

/// The pod's addresses in a CNI result.
#[must_use]
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    result["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
