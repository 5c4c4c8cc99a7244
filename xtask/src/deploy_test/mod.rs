//! `cargo xtask deploy-test`: the image, run under podman (runc) exactly as
//! the rendered manifests say ([`pod`]), on a node made of a network
//! namespace with pods as the conformance harness builds them, against
//! the project's test API server running as its own process over TLS.
//!
//! For each variant (deploy/base, deploy/privileged):
//! 1. the init container, then the agent container, from the DaemonSet;
//! 2. the readiness and liveness probes the DaemonSet names pass;
//! 3. a policy created through the API server is enforced on real pod
//!    traffic: an allowed and a denied probe per family;
//! 4. `inspect endpoints`, `explain` and `bpftool` run inside the
//!    container (`podman exec`) and name the pods, the rule, the programs;
//! 5. a scraper on the node's address parses /metrics;
//! 6. `/healthz` fails once the API server has been stopped past the
//!    agent's threshold;
//! 7. the agent exits 0 within the DaemonSet's termination grace;
//! 8. the cleanup Job's container leaves nothing pinned, attached or
//!    written.
pub(crate) mod pod;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    batch::v1::Job,
    core::v1::{Container, PodSpec},
};
use netpol_testkit::{
    Netns, echo,
    topology::{self as kit, Subnet},
};
use serde::Deserialize as _;

use crate::run as sh;

/// The node's own addresses (on its loopback: the node's uplink is not
/// part of what is tested, and a veth would be taken for a pod's).
const NODE_V4: &str = "192.168.250.2";
const NODE_V6: &str = "fd00:250::2";
/// The API server's port on the node (k3s' server listens on the node).
pub(crate) const API_PORT: u16 = 6443;
/// The pods' echo port.
const PORT: u16 = 8080;
/// How long the agent gets to do each step.
const DEADLINE: Duration = Duration::from_secs(60);
/// A denied probe waits this out; an allowed one answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// k3s's conflist and CNI binaries (the DaemonSet's hostPaths).
pub(crate) const K3S_CONFLIST: &str =
    "/var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist";
pub(crate) const K3S_CNI_BIN: &str = "/var/lib/rancher/k3s/data/cni";

/// What k3s writes there (its flannel template).
pub(crate) const FLANNEL_CONFLIST: &str = netpol_testkit::cni::K3S_FLANNEL_CONFLIST;

/// The pods of the test: name, labels, IPv4 host part.
const PODS: [(&str, &str, u8); 3] = [
    ("server", "app: server", 10),
    ("allowed", "app: client, access: \"true\"", 11),
    ("denied", "app: client", 12),
];

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {access: \"true\"}}}]
";

/// Builds the image and the test API server, loads the image into podman
/// (and reads it with skopeo, as a registry client would), then runs both
/// variants.
pub fn run() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "deploy-test runs containers and network namespaces: run it as root"
    );
    crate::bootstrap::container_tools()?;
    let built = crate::image::build()?;
    // Reproducible: the same commit, built again, is the same image.
    let again = crate::image::build()?;
    ensure!(
        again.digest == built.digest,
        "two builds of one commit gave {} and {}",
        built.digest,
        again.digest
    );
    load(&built)?;
    let apiserver = crate::apiserver_binary()?;
    run_all(&built.reference, &apiserver)
}

/// `podman load` names the image as the archive says, and `skopeo
/// inspect` reads the same manifest digest.
pub(crate) fn load(built: &crate::image::Built) -> Result<()> {
    let out = podman()
        .arg("load")
        .arg("--input")
        .arg(&built.archive)
        .output()
        .context("running podman load")?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains(&built.reference),
        "podman load {}: {said}{}",
        built.archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("deploy-test: podman load: {}", said.trim());
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", built.archive.display()))
        .output()
        .context("running skopeo")?;
    ensure!(
        out.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["Digest"].as_str() == Some(built.digest.as_str()),
        "skopeo reads digest {}, the build printed {}",
        v["Digest"],
        built.digest
    );
    println!(
        "deploy-test: skopeo inspect oci-archive: digest {}",
        built.digest
    );
    Ok(())
}

/// Runs both variants.
pub fn run_all(image: &str, apiserver: &Path) -> Result<()> {
    for variant in ["base", "privileged"] {
        println!("deploy-test: deploy/{variant}");
        let started = Instant::now();
        Case::new(variant, image, apiserver)?
            .run()
            .with_context(|| format!("deploy/{variant}"))?;
        println!(
            "deploy-test: deploy/{variant} passed in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// One variant's node, pods, API server and containers; everything is
/// removed on drop.
struct Case {
    variant: &'static str,
    image: String,
    daemonset: DaemonSet,
    job: Job,
    node: pod::Node,
    node_ns: Netns,
    pods: Vec<(String, Netns, String, IpAddr, IpAddr)>,
    apiserver_bin: PathBuf,
    apiserver: Option<Child>,
    /// Containers to remove on drop.
    containers: Vec<String>,
}

impl Case {
    fn new(variant: &'static str, image: &str, apiserver: &Path) -> Result<Self> {
        let daemonset = daemonset(variant)?;
        let tag = format!(":{}", env!("CARGO_PKG_VERSION"));
        let job_text = std::fs::read_to_string(crate::root().join("deploy/cleanup/job.yaml"))?;

        let name = format!("npdt-{variant}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let node_ns = Netns::create(&name)?;
        let root = PathBuf::from(format!("/run/netpol-deploy-test/{name}"));
        node_root(&root)?;
        let node = pod::Node {
            name: name.clone(),
            host_ip: NODE_V4.parse()?,
            netns: node_ns.path(),
            root,
            api: SocketAddr::new(NODE_V4.parse()?, API_PORT),
            service_account: PathBuf::new(),
        };
        let job: Job = serde_yaml::from_str(&job_text.replace("NODE", &node.name))?;
        for (image_of, what) in daemonset_images(&daemonset)
            .into_iter()
            .chain(job_images(&job))
        {
            ensure!(
                image_of.ends_with(&tag) && image.ends_with(&tag),
                "{what} runs {image_of}, the image built is {image}"
            );
        }
        let mut case = Self {
            variant,
            image: image.to_owned(),
            daemonset,
            job,
            node,
            node_ns,
            pods: Vec::new(),
            apiserver_bin: apiserver.to_owned(),
            apiserver: None,
            containers: Vec::new(),
        };
        case.wire()?;
        Ok(case)
    }

    /// The node's addresses and bridge, and the pods (bridged, dual-stack,
    /// as flannel's CNI makes them), each serving echo on [`PORT`].
    fn wire(&mut self) -> Result<()> {
        let n = self.node_ns.name.clone();
        kit::ip_in(&n, &["addr", "add", &format!("{NODE_V4}/32"), "dev", "lo"])?;
        kit::ip_in(&n, &["addr", "add", &format!("{NODE_V6}/128"), "dev", "lo"])?;
        for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sh(Command::new("ip").args(["netns", "exec", &n, "sysctl", "-qw", s]))?;
        }
        kit::add_bridge(&n, "10.42.0.1/24", Some("fd42::1/64"))?;
        for (i, (pod, _, host)) in PODS.iter().enumerate() {
            let ns = Netns::create(format!("{n}-{pod}"))?;
            let host_if = format!("vethdt{}{i}", &self.variant[..1]);
            let v4: IpAddr = format!("10.42.0.{host}").parse()?;
            let v6: IpAddr = format!("fd42::{host}").parse()?;
            kit::veth(&n, &host_if, &ns.name)?;
            kit::link_bridged(
                &n,
                &ns.name,
                &host_if,
                true,
                &[
                    Subnet {
                        addr: v4,
                        len: 24,
                        gateway: "10.42.0.1".parse()?,
                    },
                    Subnet {
                        addr: v6,
                        len: 64,
                        gateway: "fd42::1".parse()?,
                    },
                ],
            )?;
            echo::serve(&ns, &[v4, v6], PORT);
            self.pods.push(((*pod).to_owned(), ns, host_if, v4, v6));
        }
        // Nothing talks to the pods before the agent runs: the agent
        // without CAP_SYS_ADMIN cannot enter a pod's namespace, and binds
        // these (made without netpol-cni) by making the node resolve their
        // addresses, then reading its neighbour and bridge forwarding
        // entries. `cni_pods` makes pods with the plugin.
        Ok(())
    }

    fn run(mut self) -> Result<()> {
        self.start_apiserver()?;
        self.create_cluster()?;
        let spec = pod_spec(&self.daemonset)?.clone();
        // k3s's flannel conflist, as k3s writes it at start.
        let conflist = self.node.host_file(K3S_CONFLIST);
        std::fs::create_dir_all(conflist.parent().context("conflist folder")?)?;
        std::fs::write(&conflist, FLANNEL_CONFLIST)?;
        for c in spec.init_containers.iter().flatten() {
            let out = self.podman_run(&spec, c, false)?;
            println!("deploy-test: init container {}: {}", c.name, out.trim());
        }
        let installed = std::fs::read_to_string(&conflist)?;
        ensure!(
            installed.contains("\"type\":\"netpol-cni\"")
                && self.node.host_file(K3S_CNI_BIN).join("netpol-cni").exists(),
            "the init container did not install netpol-cni: {installed}"
        );
        ensure!(
            is_bpffs(&self.node.host_file("/sys/fs/bpf"))?,
            "the init containers left no bpffs at the node's /sys/fs/bpf"
        );
        let agent = spec
            .containers
            .iter()
            .find(|c| c.name == "agent")
            .context("no agent container")?
            .clone();
        let agent_name = self.podman_run(&spec, &agent, true)?;
        self.containers.push(agent_name.clone());

        let (ready, live) = (probe_path(&agent, true)?, probe_path(&agent, false)?);
        let ready_body = self
            .until("the readiness probe passes", |c| {
                Ok(c.http(&ready)?.filter(|(code, _)| *code == 200))
            })
            .map_err(|e| e.context(self.logs(&agent_name)))?;
        println!("deploy-test: {ready}: {}", ready_body.1.trim());
        let (code, body) = self
            .http(&live)?
            .context("no answer from the liveness probe")?;
        ensure!(code == 200, "{live}: {code} {body}");

        // k3s rewrites its conflist at every start: the agent puts the
        // plugin back.
        let conflist = self.node.host_file(K3S_CONFLIST);
        std::fs::write(&conflist, FLANNEL_CONFLIST)?;
        self.until(
            "the agent puts netpol-cni back into a rewritten conflist",
            |_| {
                Ok(std::fs::read_to_string(&conflist)?
                    .contains("\"type\":\"netpol-cni\"")
                    .then_some(()))
            },
        )
        .map_err(|e| e.context(self.logs(&agent_name)))?;
        println!("deploy-test: netpol-cni put back into a rewritten {K3S_CONFLIST}");

        self.enforced_before_and_after_policy()?;
        self.cni_pods()?;
        self.inspect_and_explain(&agent_name)?;
        self.scrape()?;

        // Healthy while the API server answers, whatever time has passed.
        let (code, body) = self
            .http(&live)?
            .context("no answer from the liveness probe")?;
        let status = self.http("/status")?.map(|s| s.1).unwrap_or_default();
        ensure!(
            code == 200,
            "{live} with the API server up: {code} {body}\n/status: {status}"
        );
        self.stop_apiserver()?;
        let why = self.until("/healthz fails with the API server stopped", |c| {
            Ok(c.http(&live)?.filter(|(code, _)| *code == 503))
        })?;
        ensure!(why.1.contains("source"), "{live}: {}", why.1);
        println!(
            "deploy-test: {live} with the API server stopped: {}",
            why.1.trim()
        );

        self.stop_within_grace(&agent_name)?;
        self.cleanup_job()?;
        Ok(())
    }

    /// `podman run` of container `c` of `spec`; `detach`: its name, else
    /// its output (it must exit 0).
    fn podman_run(&self, spec: &PodSpec, c: &Container, detach: bool) -> Result<String> {
        let name = format!("npdt-{}-{}", self.variant, c.name);
        podman_run(spec, c, &self.node, &self.image, &name, detach)
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let dir = self.node.root.join("apiserver");
        std::fs::create_dir_all(&dir)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns.name])
            .arg(&self.apiserver_bin)
            .arg("--listen")
            .arg(self.node.api.to_string())
            .arg("--tls-dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the test API server")?;
        let stdout = child.stdout.take().context("its stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(
            line.starts_with("listening on"),
            "the test API server said {line:?}"
        );
        self.node.service_account = dir.join("serviceaccount");
        self.apiserver = Some(child);
        Ok(())
    }

    fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(mut c) = self.apiserver.take() {
            // `ip netns exec` execs the server: the child is the server.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .output();
            c.wait()?;
        }
        Ok(())
    }

    /// Creates each object of `yaml` (documents) through the test API
    /// server, from the node, as any client does: a POST to its collection
    /// with the service account's token, the server checked against its
    /// CA.
    fn create(&self, yaml: &str) -> Result<()> {
        let dir = self
            .node
            .service_account
            .parent()
            .context("the API server's folder")?
            .to_owned();
        let token = std::fs::read_to_string(self.node.service_account.join("token"))?;
        for d in serde_yaml::Deserializer::from_str(yaml) {
            let obj: serde_json::Value = serde_json::to_value(serde_yaml::Value::deserialize(d)?)?;
            let url = format!("https://{}{}", self.node.api, collection(&obj)?);
            let mut child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.node_ns.name,
                    "curl",
                    "-sS",
                    "--fail-with-body",
                ])
                .arg("--cacert")
                .arg(dir.join("ca.crt"))
                .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
                .args([
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                    "@-",
                    &url,
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running curl")?;
            child
                .stdin
                .take()
                .context("curl's stdin")?
                .write_all(obj.to_string().as_bytes())?;
            let out = child.wait_with_output()?;
            ensure!(
                out.status.success(),
                "POST {url}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The node, its namespace and pods, in the API server.
    fn create_cluster(&self) -> Result<()> {
        let mut objects = format!(
            "apiVersion: v1
kind: Node
metadata: {{name: {node}}}
status:
  addresses: [{{type: InternalIP, address: {NODE_V4}}}, {{type: InternalIP, address: \"{NODE_V6}\"}}]
---
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{kubernetes.io/metadata.name: demo}}}}
",
            node = self.node.name
        );
        for ((name, labels, _), (_, _, _, v4, v6)) in PODS.iter().zip(&self.pods) {
            objects.push_str(&format!(
                "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, uid: uid-{name}, labels: {{{labels}}}}}
spec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: \"{v4}\", podIPs: [{{ip: \"{v4}\"}}, {{ip: \"{v6}\"}}]}}
",
                node = self.node.name
            ));
        }
        self.create(&objects)?;
        Ok(())
    }

    fn pod(&self, name: &str) -> &(String, Netns, String, IpAddr, IpAddr) {
        self.pods
            .iter()
            .find(|p| p.0 == name)
            .unwrap_or_else(|| unreachable!("pod {name} is one of PODS"))
    }

    /// Whether each client reaches the server, per family, as `want`
    /// says: (allowed v4, allowed v6, denied v4, denied v6).
    fn probes(&self) -> [bool; 4] {
        let server = self.pod("server");
        let mut out = [false; 4];
        for (i, client) in ["allowed", "denied"].iter().enumerate() {
            let c = self.pod(client);
            out[2 * i] = echo::connects(&c.1, server.3, PORT, CONNECT_TIMEOUT);
            out[2 * i + 1] = echo::connects(&c.1, server.4, PORT, CONNECT_TIMEOUT);
        }
        out
    }

    fn enforced_before_and_after_policy(&self) -> Result<()> {
        // Ready is the state applied; a pod's veth is bound once its
        // address is seen behind it (the bridge learns it from the pod's
        // first packets), so the first probes may meet the fail-closed
        // default.
        self.until("every probe passes without a policy", |c| {
            Ok((c.probes() == [true; 4]).then_some(()))
        })
        .map_err(|e| e.context(self.endpoints()))?;
        self.create(POLICY)?;
        let want = [true, true, false, false];
        self.until(
            "the policy is enforced (allowed v4/v6, denied v4/v6)",
            |c| Ok((c.probes() == want).then_some(())),
        )
        .map_err(|e| e.context(self.endpoints()))?;
        println!(
            "deploy-test: policy server-ingress enforced: allowed -> server passes and denied -> \
             server is dropped, IPv4 and IPv6"
        );
        Ok(())
    }

    /// Pods made by a CNI chain with the plugin the init container
    /// installed, talking to the agent in its container: each is enforced
    /// the moment ADD returns, with the variant's capabilities (the base
    /// one cannot enter a pod's namespace), before the API server has its
    /// addresses and before it sends a packet.
    fn cni_pods(&self) -> Result<()> {
        use netpol_testkit::cni::{Chain, Sandbox, result_ips};
        let ipam = self.node.root.join("var/lib/cni/networks");
        std::fs::create_dir_all(&ipam)?;
        let chain = Chain {
            conflist: serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "cbr0",
                "plugins": [
                    {
                        "type": "bridge", "bridge": "cni0", "isGateway": true, "hairpinMode": true,
                        "ipam": {
                            "type": "host-local", "dataDir": ipam,
                            "ranges": [
                                [{"subnet": "10.42.0.0/24", "rangeStart": "10.42.0.100", "gateway": "10.42.0.1"}],
                                [{"subnet": "fd42::/64", "rangeStart": "fd42::100", "gateway": "fd42::1"}],
                            ],
                        },
                    },
                    {
                        "type": "netpol-cni",
                        "socket": self.node.host_file("/run/netpol").join("cni.sock"),
                        "timeoutMs": 5000,
                    },
                ],
            }),
            path: vec![
                self.node.host_file(K3S_CNI_BIN),
                PathBuf::from(netpol_testkit::cni::DEBIAN_PLUGINS),
            ],
            direct: false,
        };
        let server = self.pod("server");
        for (name, labels, want) in [
            ("late-allowed", "app: client, access: \"true\"", true),
            ("late-denied", "app: client", false),
        ] {
            self.create(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, uid: uid-{name}, \
                 labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}\n\
                 status: {{phase: Pending}}\n",
                node = self.node.name
            ))?;
            let ns = Netns::create(format!("npdt-{}-{name}", &self.variant[..1]))?;
            let sandbox = Sandbox::new("demo", name);
            let start = std::time::Instant::now();
            let result = chain
                .add(&self.node_ns, &ns, &sandbox)
                .map_err(|e| anyhow::anyhow!("ADD {name}: {e}"))
                .map_err(|e| e.context(self.endpoints()))?;
            let took = start.elapsed();
            let ips = result_ips(&result);
            ensure!(ips.len() == 2, "ADD {name}: {result}");
            // At once: an allowed connection is answered on its first SYN
            // (shorter than its retransmission), a denied one never.
            let timeout = if want {
                Duration::from_millis(900)
            } else {
                CONNECT_TIMEOUT
            };
            for dst in [server.3, server.4] {
                let got = echo::connects(&ns, dst, PORT, timeout);
                ensure!(
                    got == want,
                    "{name} -> {dst} right after ADD (took {took:?}): {}",
                    if want {
                        "not answered on its first SYN"
                    } else {
                        "connected, yet denied"
                    }
                );
            }
            println!(
                "deploy-test: {name} made by bridge + netpol-cni (ADD {} ms): {}, IPv4 and IPv6",
                took.as_millis(),
                if want {
                    "reaches server on its first SYN"
                } else {
                    "never reaches server"
                }
            );
            chain
                .del(&self.node_ns, &ns, &sandbox, Some(&result))
                .map_err(|e| anyhow::anyhow!("DEL {name}: {e}"))?;
        }
        Ok(())
    }

    /// What the agent says of the node's endpoints, for a failure's
    /// report.
    fn endpoints(&self) -> String {
        let name = format!("npdt-{}-agent", self.variant);
        let shown = self
            .exec(&name, &["netpol-agent", "inspect", "endpoints"])
            .map(|(_, out)| out)
            .unwrap_or_default();
        format!("inspect endpoints:\n{shown}\n{}", self.logs(&name))
    }

    fn exec(&self, container: &str, args: &[&str]) -> Result<(i32, String)> {
        let out = podman()
            .args(["exec", container])
            .args(args)
            .output()
            .context("podman exec")?;
        Ok((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    fn inspect_and_explain(&self, agent: &str) -> Result<()> {
        let (code, out) = self.exec(agent, &["netpol-agent", "inspect", "endpoints"])?;
        ensure!(code == 0, "inspect endpoints: {out}");
        for (pod, ..) in &self.pods {
            ensure!(
                out.contains(&format!("demo/{pod}")),
                "inspect endpoints does not name demo/{pod}:\n{out}"
            );
        }
        println!("deploy-test: podman exec … netpol-agent inspect endpoints\n{out}");
        let (code, out) = self.exec(
            agent,
            &[
                "netpol-agent",
                "explain",
                "demo/allowed",
                "demo/server",
                "tcp/8080",
            ],
        )?;
        ensure!(
            code == 0 && out.contains("server-ingress"),
            "explain allowed -> server (exit {code}):\n{out}"
        );
        let (code, out) = self.exec(
            agent,
            &[
                "netpol-agent",
                "explain",
                "demo/denied",
                "demo/server",
                "tcp/8080",
            ],
        )?;
        ensure!(
            code == 1 && out.contains("server-ingress"),
            "explain denied -> server (exit {code}):\n{out}"
        );
        println!(
            "deploy-test: podman exec … netpol-agent explain demo/denied demo/server tcp/8080\n{out}"
        );
        // Debian's bpftool (7.1) lists netlink filters only, not TCX
        // links; listing programs and reading a map's BTF need
        // CAP_SYS_ADMIN: bpftool works in the privileged variant's
        // container, `inspect` (CAP_BPF) in both.
        let (code, out) = self.exec(agent, &["bpftool", "prog", "show"])?;
        if self.variant != "privileged" {
            println!(
                "deploy-test: podman exec … bpftool prog show (exit {code}, no CAP_SYS_ADMIN): {}",
                out.trim()
            );
            return Ok(());
        }
        ensure!(
            code == 0 && out.contains("name from_pod") && out.contains("name to_pod"),
            "bpftool prog show (exit {code}):\n{out}"
        );
        let programs: Vec<&str> = out.lines().filter(|l| l.contains(" name ")).collect();
        println!(
            "deploy-test: podman exec … bpftool prog show (program lines)\n{}",
            programs.join("\n")
        );
        let (code, out) = self.exec(
            agent,
            &[
                "bpftool",
                "map",
                "dump",
                "pinned",
                "/sys/fs/bpf/netpol/NETPOL_ENDPOINTS",
            ],
        )?;
        ensure!(
            code == 0 && out.contains("\"key\""),
            "bpftool map dump pinned …/NETPOL_ENDPOINTS (exit {code}):\n{out}"
        );
        println!(
            "deploy-test: podman exec … bpftool map dump pinned /sys/fs/bpf/netpol/NETPOL_ENDPOINTS \
             ({} lines):\n{}",
            out.lines().count(),
            out.lines().take(12).collect::<Vec<_>>().join("\n")
        );
        Ok(())
    }

    /// GETs /metrics on the node's address and parses every sample line.
    fn scrape(&self) -> Result<()> {
        let (code, body) = self.http("/metrics")?.context("no answer from /metrics")?;
        ensure!(code == 200, "/metrics: {code}");
        let samples = parse_metrics(&body)?;
        for name in [
            "netpol_generation",
            "netpol_interfaces",
            "netpol_sync_duration_seconds_count",
        ] {
            ensure!(
                samples.iter().any(|(n, _)| n.starts_with(name)),
                "/metrics has no {name}"
            );
        }
        println!(
            "deploy-test: scraped http://{NODE_V4}:9101/metrics: {} samples",
            samples.len()
        );
        Ok(())
    }

    /// `podman stop` with the DaemonSet's grace: the agent must exit 0
    /// itself, not be killed.
    fn stop_within_grace(&self, agent: &str) -> Result<()> {
        let grace = pod_spec(&self.daemonset)?
            .termination_grace_period_seconds
            .unwrap_or(30);
        let started = Instant::now();
        sh(podman().args(["stop", "--time", &grace.to_string(), agent]))?;
        let out = podman()
            .args(["inspect", "--format", "{{.State.ExitCode}}", agent])
            .output()?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            code == "0",
            "the agent exited {code} on SIGTERM (grace {grace} s)\n{}",
            self.logs(agent)
        );
        println!(
            "deploy-test: the agent exited 0 {:.1} s after SIGTERM (grace {grace} s)",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The cleanup Job's container, then nothing of netpol's on the node,
    /// the conflist as k3s wrote it included.
    fn cleanup_job(&self) -> Result<()> {
        let spec = self
            .job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("the cleanup Job has no pod spec")?;
        let c = &spec.containers[0];
        let out = self.podman_run(spec, c, false)?;
        println!("deploy-test: cleanup Job: {}", out.trim());
        ensure!(out.contains("pins removed"), "cleanup: {out}");
        let conflist = std::fs::read_to_string(self.node.host_file(K3S_CONFLIST))?;
        ensure!(
            conflist == FLANNEL_CONFLIST,
            "cleanup left the conflist other than it found it: {conflist}"
        );
        let plugin = self.node.host_file(K3S_CNI_BIN).join("netpol-cni");
        ensure!(!plugin.exists(), "{} is still there", plugin.display());
        let pins = self.node.host_file("/sys/fs/bpf").join("netpol");
        ensure!(!pins.exists(), "{} is still there", pins.display());
        let state = self.node.host_file("/run/netpol").join("state.json");
        ensure!(!state.exists(), "{} is still there", state.display());
        // Nothing attached: the denied pod reaches the server again.
        self.until(
            "the denied pod reaches the server with netpol removed",
            |c| Ok((c.probes() == [true; 4]).then_some(())),
        )?;
        Ok(())
    }

    fn logs(&self, container: &str) -> String {
        logs(container)
    }

    /// GET `path` on the agent's port at the node's address, from the node
    /// (as the kubelet probes and Prometheus scrapes): `None` when nothing
    /// answers.
    fn http(&self, path: &str) -> Result<Option<(u16, String)>> {
        let addr = SocketAddr::new(self.node.host_ip, 9101);
        let path = path.to_owned();
        Ok(self.node_ns.run(move || http_get(addr, &path).ok()))
    }

    /// Polls `f` until it gives a value, for at most [`DEADLINE`] (which
    /// must exceed the agent's 30 s liveness threshold: the `/healthz`
    /// step waits on it).
    fn until<T>(&self, what: &str, mut f: impl FnMut(&Self) -> Result<Option<T>>) -> Result<T> {
        until(DEADLINE, Duration::from_millis(250), what, || f(self))
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman().args(["rm", "-f", "--time", "0", c]).output();
        }
        let _ = self.stop_apiserver();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(&self.node.root)
            .output();
        let _ = std::fs::remove_dir_all(&self.node.root);
    }
}

/// The DaemonSet of `deploy/<variant>`, rendered.
pub(crate) fn daemonset(variant: &str) -> Result<DaemonSet> {
    let rendered = crate::deploy::kustomize(variant)?;
    for d in serde_yaml::Deserializer::from_str(&rendered) {
        let v = serde_yaml::Value::deserialize(d)?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("DaemonSet") {
            return Ok(serde_yaml::from_value::<DaemonSet>(v)?);
        }
    }
    bail!("no DaemonSet in the rendered deploy/{variant}")
}

/// `podman run` of container `c` of `spec` on `node` from `image`, named
/// `name` (a container of that name is removed first); `detach`: its
/// name, else its output (it must exit 0).
pub(crate) fn podman_run(
    spec: &PodSpec,
    c: &Container,
    node: &pod::Node,
    image: &str,
    name: &str,
    detach: bool,
) -> Result<String> {
    let _ = podman().args(["rm", "-f", name]).output();
    let args = pod::run_args(spec, c, node, image, name, detach)?;
    let out = podman()
        .arg("run")
        .args(&args)
        .output()
        .context("running podman")?;
    ensure!(
        out.status.success(),
        "podman run {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(if detach {
        name.to_owned()
    } else {
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// Polls `f` every `every` until it gives a value, or fails once `within`
/// has passed.
pub(crate) fn until<T>(
    within: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting until {what}");
        }
        std::thread::sleep(every);
    }
}

/// The container's last 40 log lines, for a failure's report.
pub(crate) fn logs(container: &str) -> String {
    podman()
        .args(["logs", "--tail", "40", container])
        .output()
        .map(|o| {
            format!(
                "last log lines of {container}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

pub(crate) fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(pod::PODMAN);
    c
}

/// The node's root folder, a shared mount of its own: a hostPath mounted
/// `Bidirectional` (the init container's bpffs) must propagate back.
pub(crate) fn node_root(root: &Path) -> Result<()> {
    let _ = Command::new("umount").arg("-R").arg(root).output();
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    sh(Command::new("mount").arg("--bind").arg(root).arg(root))?;
    sh(Command::new("mount").arg("--make-rshared").arg(root))?;
    Ok(())
}

pub(crate) fn is_bpffs(p: &Path) -> Result<bool> {
    let st = nix::sys::statfs::statfs(p).with_context(|| format!("statfs {}", p.display()))?;
    Ok(st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

pub(crate) fn pod_spec(ds: &DaemonSet) -> Result<&PodSpec> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the DaemonSet has no pod spec")
}

fn daemonset_images(ds: &DaemonSet) -> Vec<(String, String)> {
    pod_spec(ds)
        .map(|p| {
            p.containers
                .iter()
                .chain(p.init_containers.iter().flatten())
                .map(|c| {
                    (
                        c.image.clone().unwrap_or_default(),
                        format!("container {}", c.name),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn job_images(job: &Job) -> Vec<(String, String)> {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| {
            p.containers
                .iter()
                .map(|c| {
                    (
                        c.image.clone().unwrap_or_default(),
                        format!("cleanup container {}", c.name),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The collection an object is created in: `/api/v1/…` or
/// `/apis/<group>/<version>/…`, under its namespace when it has one.
fn collection(obj: &serde_json::Value) -> Result<String> {
    let kind = obj["kind"].as_str().context("an object without kind")?;
    ensure!(
        netpol_testkit::resources::serves(kind),
        "the deploy test creates no {kind}"
    );
    Ok(netpol_testkit::resources::collection_path(
        kind,
        obj["metadata"]["namespace"].as_str().unwrap_or_default(),
    ))
}

/// The path of the agent's readiness (`ready`) or liveness probe, which
/// must be an httpGet on the port the agent listens on.
pub(crate) fn probe_path(agent: &Container, ready: bool) -> Result<String> {
    let probe = if ready {
        agent.readiness_probe.as_ref()
    } else {
        agent.liveness_probe.as_ref()
    };
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .context("the agent's probes must be httpGet")?;
    ensure!(get.host.is_none(), "a probe host other than the pod's IP");
    ensure!(
        get.port == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9101),
        "probe port {:?}",
        get.port
    );
    get.path.clone().context("a probe without a path")
}

/// A plain HTTP/1.1 GET: (status, body).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((code, body.to_owned()))
}

/// Prometheus' text format: every line not a comment is `name{labels}
/// value`, the value a float. Returns (name with labels, value).
fn parse_metrics(body: &str) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("a metrics line without a value: {line:?}"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .with_context(|| format!("a metrics value that is not a number: {line:?}"))?,
        };
        let name_end = series.find('{').unwrap_or(series.len());
        ensure!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "a metric name Prometheus refuses: {line:?}"
        );
        if name_end < series.len() {
            ensure!(series.ends_with('}'), "unterminated labels: {line:?}");
        }
        out.push((series.to_owned(), v));
    }
    ensure!(!out.is_empty(), "no samples");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_bad_lines_are_named() {
        let ok = "# HELP x y\n# TYPE x gauge\nnetpol_generation 3\nnetpol_x{kind=\"Pod\"} 1.5\nh_bucket{le=\"+Inf\"} 2\n";
        let s = parse_metrics(ok).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1], ("netpol_x{kind=\"Pod\"}".to_owned(), 1.5));
        assert!(parse_metrics("netpol_x notanumber\n").is_err());
        assert!(parse_metrics("bad-name 1\n").is_err());
        assert!(parse_metrics("# only comments\n").is_err());
    }
}
