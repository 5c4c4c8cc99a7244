//! deploy/: every manifest parses into k8s-openapi types (and loses no field
//! doing so), the ClusterRole grants exactly what the kube source watches,
//! and the DaemonSet agrees with the agent's defaults.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    batch::v1::Job,
    core::v1::{
        Container, Namespace, Node, Pod, PodSpec, Service, ServiceAccount, Volume, VolumeMount,
    },
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use netpol_agent::{
    agent::DEFAULT_LISTEN, datapath::DEFAULT_BPFFS, provenance::DEFAULT_STATE_DIR,
    sources::kube::WATCHED,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The base every variant builds on.
fn base_dir() -> PathBuf {
    deploy().join("base")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` as a `T`, checking that nothing was dropped on the way (a misspelt
/// field would be).
fn typed<T: DeserializeOwned + Serialize>(v: &Value, what: &str) -> T {
    let t: T = serde_yaml::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_yaml::to_value(&t).unwrap();
    let mut orig = v.clone();
    if let Value::Mapping(m) = &mut orig {
        // The type knows its apiVersion and kind and writes them back.
        m.remove("apiVersion");
        m.remove("kind");
    }
    let mut back = back;
    if let Value::Mapping(m) = &mut back {
        m.remove("apiVersion");
        m.remove("kind");
    }
    assert_eq!(
        normalize(orig),
        normalize(back),
        "{what}: fields lost or changed parsing into k8s-openapi types"
    );
    t
}

/// Drops null values, which the types do not write back, and reads whole
/// floats as integers (a schema's `minimum: 1` comes back as `1.0`).
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0 && !n.is_i64()) =>
        {
            #[expect(clippy::cast_possible_truncation, reason = "a whole float")]
            Value::Number((n.as_f64().unwrap_or_default() as i64).into())
        }
        Value::Mapping(m) => Value::Mapping(
            m.into_iter()
                .map(|(k, v)| (k, normalize(v)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(normalize).collect()),
        v => v,
    }
}

fn is_kustomization(v: &Value) -> bool {
    v.get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|a| a.starts_with("kustomize.config.k8s.io/"))
}

#[derive(Default)]
struct Manifests {
    namespaces: Vec<(PathBuf, Namespace)>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<(PathBuf, DaemonSet)>,
    jobs: Vec<Job>,
    crds: Vec<CustomResourceDefinition>,
    kustomizations: Vec<(PathBuf, Value)>,
}

/// The file `cargo xtask render-deploy` writes (checked against
/// `kubectl kustomize`, not loaded with the sources).
fn rendered() -> PathBuf {
    deploy().join("netpol.yaml")
}

fn load() -> Manifests {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    files.retain(|f| *f != rendered());
    assert!(!files.is_empty());
    let mut m = Manifests::default();
    for f in files {
        for (i, v) in docs(&f).into_iter().enumerate() {
            let what = format!("{} document {i}", f.display());
            m.add(&f, v, &what);
        }
    }
    m
}

impl Manifests {
    /// Files `v` by kind, checked against the Kubernetes types.
    fn add(&mut self, f: &Path, v: Value, what: &str) {
        if is_kustomization(&v) {
            self.kustomizations.push((f.to_owned(), v));
            return;
        }
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "Namespace" => self.namespaces.push((f.to_owned(), typed(&v, what))),
            "ServiceAccount" => self.service_accounts.push(typed(&v, what)),
            "ClusterRole" => self.cluster_roles.push(typed(&v, what)),
            "ClusterRoleBinding" => self.bindings.push(typed(&v, what)),
            "DaemonSet" => self.daemonsets.push((f.to_owned(), typed(&v, what))),
            "Job" => self.jobs.push(typed(&v, what)),
            "CustomResourceDefinition" => self.crds.push(typed(&v, what)),
            // The demo's cluster (deploy/examples).
            "Node" => drop(typed::<Node>(&v, what)),
            "Pod" => drop(typed::<Pod>(&v, what)),
            "Service" => drop(typed::<Service>(&v, what)),
            "EndpointSlice" => drop(typed::<EndpointSlice>(&v, what)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(&v, what)),
            other => panic!("{what}: unexpected kind {other:?}"),
        }
    }
}

/// `kubectl kustomize deploy/<variant>`.
fn kustomize(variant: &str) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join(variant))
        .output()
        .expect("kubectl (installed on these machines) runs");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{variant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The objects `kubectl kustomize deploy/<variant>` builds, each checked
/// against the Kubernetes types (the schemas of the API version k8s-openapi
/// is built for, see the workspace Cargo.toml).
fn built(variant: &str) -> Manifests {
    let text = kustomize(variant);
    let mut m = Manifests::default();
    let path = deploy().join(variant);
    for (i, d) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(d).unwrap();
        m.add(
            &path,
            v,
            &format!("kubectl kustomize deploy/{variant}, object {i}"),
        );
    }
    m
}

/// The image the release's manifests name.
fn release_image() -> String {
    format!("ghcr.io/netpol/netpol-agent:{}", env!("CARGO_PKG_VERSION"))
}

#[test]
fn both_variants_build_with_kustomize_into_valid_objects() {
    for (variant, privileged) in [("base", false), ("privileged", true)] {
        let m = built(variant);
        assert_eq!(
            (
                m.namespaces.len(),
                m.service_accounts.len(),
                m.cluster_roles.len()
            ),
            (1, 1, 1),
            "{variant}"
        );
        assert_eq!((m.bindings.len(), m.daemonsets.len()), (1, 1), "{variant}");
        let ds = &m.daemonsets[0].1;
        assert_eq!(ds.metadata.namespace.as_deref(), Some("netpol-system"));
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            assert_eq!(
                c.image.as_deref(),
                Some(release_image().as_str()),
                "{variant}: {}",
                c.name
            );
        }
        let agent = container(ds, "agent", false);
        assert_eq!(
            agent.security_context.as_ref().unwrap().privileged == Some(true),
            privileged,
            "{variant}"
        );
    }
}

#[test]
fn the_k3s_manifest_is_the_base_rendered_and_every_manifest_names_the_release() {
    let text = std::fs::read_to_string(rendered()).expect("deploy/netpol.yaml");
    let body: String = text
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        body == kustomize("base"),
        "deploy/netpol.yaml is not deploy/base rendered: run `cargo xtask render-deploy`"
    );
    let m = load();
    assert_eq!(m.jobs.len(), 1, "the cleanup Job");
    let job = m.jobs[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let c = &job.containers[0];
    assert_eq!(c.image.as_deref(), Some(release_image().as_str()));
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("cleanup"));
    // It takes netpol-cni out of the folders the DaemonSet put it in.
    let agent = container(daemonset(&m), "agent", false);
    let dirs = |args: &[String]| -> Vec<String> {
        args.iter()
            .filter(|a| a.starts_with("--cni-bin-dir=") || a.starts_with("--cni-conf-dir="))
            .cloned()
            .collect()
    };
    assert_eq!(dirs(&args), dirs(agent.args.as_deref().unwrap_or_default()));
    assert_eq!(dirs(&args).len(), 2, "{args:?}");
    let bpffs = host_path_volume(job, DEFAULT_BPFFS, "the host's bpffs");
    assert!(
        c.volume_mounts
            .as_deref()
            .unwrap()
            .iter()
            .any(|v| v.name == bpffs.name && v.mount_path == DEFAULT_BPFFS)
    );
}

/// The base DaemonSet (the privileged variant is a patch over it).
fn daemonset(m: &Manifests) -> &DaemonSet {
    let base: Vec<_> = m
        .daemonsets
        .iter()
        .filter(|(p, _)| p.parent() == Some(base_dir().as_path()))
        .collect();
    assert_eq!(base.len(), 1, "one DaemonSet in deploy/base/");
    &base[0].1
}

/// The volume of `pod` that is the host's `path`.
fn host_path_volume<'a>(pod: &'a PodSpec, path: &str, what: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == path))
        .unwrap_or_else(|| panic!("no hostPath volume of {path}: {what}"))
}

/// Where container `c` mounts `volume`.
fn mount_of<'a>(c: &'a Container, volume: &str) -> Option<&'a VolumeMount> {
    c.volume_mounts.iter().flatten().find(|m| m.name == volume)
}

fn container<'a>(ds: &'a DaemonSet, name: &str, init: bool) -> &'a Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let list = if init {
        spec.init_containers.as_deref().unwrap_or_default()
    } else {
        &spec.containers
    };
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn kustomizations_list_every_manifest_and_only_existing_ones() {
    let m = load();
    assert!(!m.kustomizations.is_empty());
    for (path, k) in &m.kustomizations {
        let dir = path.parent().unwrap();
        let listed: Vec<&str> = k
            .get("resources")
            .and_then(Value::as_sequence)
            .map(|s| s.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for r in &listed {
            assert!(dir.join(r).exists(), "{}: {r} is missing", path.display());
        }
        for p in k
            .get("patches")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let f = p.get("path").and_then(Value::as_str).unwrap();
            assert!(dir.join(f).is_file(), "{}: {f} is missing", path.display());
        }
    }
    // The base lists every manifest next to it.
    let (_, base) = m
        .kustomizations
        .iter()
        .find(|(p, _)| p.parent() == Some(base_dir().as_path()))
        .expect("deploy/base/kustomization.yaml");
    let listed: BTreeSet<&str> = base["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for e in std::fs::read_dir(base_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap();
        if p.extension().is_some_and(|x| x == "yaml") && name != "kustomization.yaml" {
            assert!(listed.contains(name), "kustomization.yaml misses {name}");
        }
    }
    let ns = base["namespace"].as_str().unwrap();
    let own: Vec<_> = m
        .namespaces
        .iter()
        .filter(|(p, _)| p.parent() == Some(base_dir().as_path()))
        .collect();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].1.metadata.name.as_deref(), Some(ns));
}

#[test]
fn cluster_role_grants_exactly_what_the_watchers_use() {
    let m = load();
    assert_eq!(m.cluster_roles.len(), 1);
    let role = &m.cluster_roles[0];
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.as_deref().unwrap_or_default() {
            for r in rule.resources.as_deref().unwrap_or_default() {
                granted
                    .entry((g.clone(), r.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let watched: BTreeMap<(String, String), BTreeSet<String>> = WATCHED
        .iter()
        .map(|(g, r, verbs)| {
            (
                ((*g).to_owned(), (*r).to_owned()),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect();
    assert_eq!(granted, watched);

    // Bound to the DaemonSet's service account.
    let ds = daemonset(&m);
    let sa = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let sa_name = sa.service_account_name.as_deref().unwrap();
    assert_eq!(m.service_accounts.len(), 1);
    assert_eq!(
        m.service_accounts[0].metadata.name.as_deref(),
        Some(sa_name)
    );
    assert_eq!(m.bindings.len(), 1);
    let b = &m.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.as_deref().unwrap();
    assert!(subjects.iter().any(|s| s.kind == "ServiceAccount"
        && s.name == sa_name
        && s.namespace == m.service_accounts[0].metadata.namespace));
}

#[test]
fn daemonset_matches_the_agents_defaults() {
    let m = load();
    let ds = daemonset(&m);
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_deref().unwrap();
    assert!(
        tolerations.iter().any(|t| t.key.is_none()
            && t.effect.is_none()
            && t.operator.as_deref() == Some("Exists")),
        "tolerates every taint"
    );

    // Rolling update: one node at a time, never two agents on a node.
    let ru = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .unwrap();
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    assert_eq!(
        ru.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );

    // bpffs: the host's, at the agent's default path, mounted on the host by
    // a privileged init container and seen by the agent through propagation.
    let bpffs_volume =
        host_path_volume(pod, DEFAULT_BPFFS, "a hostPath volume of the default bpffs");
    let init = container(ds, "init", true);
    let init_args = init.args.clone().unwrap_or_default();
    assert_eq!(
        init_args.first().map(String::as_str),
        Some("init"),
        "the agent binary mounts bpffs (the image has no shell)"
    );
    // netpol-cni: installed by init where the agent keeps it, naming the
    // socket the agent serves, from the image's binary.
    let cni = |args: &[String]| -> Vec<String> {
        args.iter()
            .filter(|a| a.starts_with("--cni-"))
            .cloned()
            .collect()
    };
    let agent_args = container(ds, "agent", false)
        .args
        .clone()
        .unwrap_or_default();
    assert_eq!(cni(&init_args), cni(&agent_args));
    for want in [
        "--cni-socket=/run/netpol/cni.sock",
        "--cni-plugin=/usr/lib/netpol/netpol-cni",
    ] {
        assert!(
            agent_args.iter().any(|a| a == want),
            "{want} in {agent_args:?}"
        );
    }
    let init_mount = init
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == bpffs_volume.name)
        .unwrap();
    assert_eq!(init_mount.mount_path, DEFAULT_BPFFS);
    assert_eq!(
        init_mount.mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_eq!(
        init.security_context.as_ref().unwrap().privileged,
        Some(true)
    );

    let agent = container(ds, "agent", false);
    let mount = agent
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == bpffs_volume.name)
        .unwrap();
    assert_eq!(mount.mount_path, DEFAULT_BPFFS);
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));

    // Least capabilities, not privileged.
    let sc = agent.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"])
    );

    // Env: NODE_NAME and HOST_IP from the downward API; nothing overriding
    // the bpffs or the state folder.
    let env = agent.env.as_deref().unwrap();
    for (name, field) in [("NODE_NAME", "spec.nodeName"), ("HOST_IP", "status.hostIP")] {
        let e = env.iter().find(|e| e.name == name).unwrap();
        assert_eq!(
            e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some(field)
        );
    }
    for e in env {
        assert!(
            ["NODE_NAME", "HOST_IP", "RUST_LOG"].contains(&e.name.as_str()),
            "unexpected env {}: the DaemonSet runs the agent's defaults",
            e.name
        );
    }
    let args = agent.args.as_deref().unwrap();
    let listen: SocketAddr = DEFAULT_LISTEN.parse().unwrap();
    let without_cni: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with("--cni-"))
        .cloned()
        .collect();
    assert_eq!(
        without_cni,
        [
            "run".to_owned(),
            "--cgroup-root=/host/sys/fs/cgroup".to_owned(),
            format!("--listen=[$(HOST_IP)]:{}", listen.port()),
        ],
        "the agent's defaults (--bpffs, --state-dir), the host's cgroup hierarchy, and HTTP on \
         the node's address at the default port"
    );
    // --cgroup-root is the host's /sys/fs/cgroup: the container's own
    // shows only its cgroup namespace, where to_host would see nothing.
    let cgroup = host_path_volume(pod, "/sys/fs/cgroup", "a hostPath volume of /sys/fs/cgroup");
    assert!(
        mount_of(agent, &cgroup.name).is_some_and(|m| m.mount_path == "/host/sys/fs/cgroup"),
        "the host's cgroup hierarchy at --cgroup-root"
    );

    // The state file on the host, where the agent writes it by default:
    // it outlives the agent's pod, as the pins do.
    let state = host_path_volume(
        pod,
        DEFAULT_STATE_DIR,
        "a hostPath volume of the state folder",
    );
    assert!(
        mount_of(agent, &state.name)
            .is_some_and(|m| m.mount_path == DEFAULT_STATE_DIR && m.read_only != Some(true)),
        "the state folder mounted writable where the agent writes it"
    );

    // Unconfined by AppArmor and SELinux (they deny writes under
    // /sys/fs/bpf), in the field and in the annotation older kubelets read.
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(
        psc.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
    assert_eq!(
        psc.se_linux_options
            .as_ref()
            .and_then(|o| o.type_.as_deref()),
        Some("spc_t")
    );
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    for c in ["init", "agent"] {
        assert_eq!(
            annotations
                .get(&format!(
                    "container.apparmor.security.beta.kubernetes.io/{c}"
                ))
                .map(String::as_str),
            Some("unconfined"),
            "{c}"
        );
    }
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux")
    );
    // Scraped on the port the agent listens on.
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some(listen.port().to_string().as_str())
    );
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );

    // Ports and probes: the default port on the node's address (the probe's
    // default host, the pod's IP, is the node's with hostNetwork).
    let ports = agent.ports.as_deref().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.container_port == i32::from(listen.port()))
    );
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe.unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                listen.port()
            ))
        );
        assert_eq!(get.host, None, "the pod's IP: the node's");
    }

    let requests = agent
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

#[test]
fn privileged_variant_patches_the_agent_container() {
    let m = load();
    let variant: Vec<_> = m
        .daemonsets
        .iter()
        .filter(|(p, _)| p.parent() == Some(deploy().join("privileged").as_path()))
        .collect();
    assert_eq!(variant.len(), 1);
    let (_, ds) = variant[0];
    assert_eq!(ds.metadata.name, daemonset(&m).metadata.name);
    let agent = container(ds, "agent", false);
    assert_eq!(
        agent.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
}

/// Every field of `value` (an object the agent decodes) in `schema`, and
/// every property of `schema` in `value` (`value` sets every field): the
/// CRD serves exactly the fields `netpol_agent::api` reads.
fn schema_covers(schema: &JSONSchemaProps, value: &serde_json::Value, at: &str) {
    match value {
        serde_json::Value::Object(map) => {
            // Object metadata and status are the API server's; a map
            // (`matchLabels`) has keys of its own.
            if at == ".metadata" || at == ".status" || schema.additional_properties.is_some() {
                return;
            }
            let props = schema.properties.clone().unwrap_or_default();
            for (k, v) in map {
                let sub = props
                    .get(k)
                    .unwrap_or_else(|| panic!("the CRD has no {at}.{k}"));
                schema_covers(sub, v, &format!("{at}.{k}"));
            }
            for k in props.keys() {
                assert!(
                    map.contains_key(k),
                    "netpol does not read the CRD's {at}.{k}"
                );
            }
        }
        serde_json::Value::Array(items) => {
            let item = match &schema.items {
                Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s)) => s,
                other => panic!("{at}: an array without one item schema: {other:?}"),
            };
            for v in items {
                schema_covers(item, v, &format!("{at}[]"));
            }
        }
        _ => {}
    }
}

#[test]
fn the_cluster_network_policy_crd_serves_the_fields_the_agent_reads() {
    use netpol_agent::api;
    let m = load();
    let [crd] = m.crds.as_slice() else {
        panic!("one CRD in deploy/, found {}", m.crds.len());
    };
    assert_eq!(crd.spec.group, api::GROUP);
    assert_eq!(crd.spec.names.kind, api::KIND);
    assert_eq!(crd.spec.names.plural, api::PLURAL);
    assert_eq!(crd.spec.scope, "Cluster");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, api::VERSION);
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a schema");
    // One object with every field of every type set, each form of a one-of
    // in its own list entry.
    let selector = serde_json::json!({"matchLabels": {"a": "b"},
        "matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]});
    let pods = serde_json::json!({"namespaceSelector": selector, "podSelector": selector});
    let port =
        serde_json::json!({"destinationPort": {"number": 80, "range": {"start": 1, "end": 2}}});
    let protocols = serde_json::json!([{"tcp": port, "udp": port, "sctp": port,
                                        "destinationNamedPort": "web"}]);
    let full: api::ClusterNetworkPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": api::API_VERSION, "kind": api::KIND,
        "metadata": {"name": "all-fields"},
        "spec": {
            "tier": "Admin", "priority": 1,
            "subject": {"namespaces": selector, "pods": pods},
            "ingress": [{"name": "i", "action": "Accept",
                         "from": [{"namespaces": selector, "pods": pods}],
                         "protocols": protocols}],
            "egress": [{"name": "e", "action": "Deny",
                        "to": [{"namespaces": selector, "pods": pods, "nodes": selector,
                                "networks": ["10.0.0.0/8"], "domainNames": ["example.com"]}],
                        "protocols": protocols}]
        },
        "status": {"conditions": []}
    }))
    .expect("the api types");
    let value = serde_json::to_value(&full).expect("JSON");
    schema_covers(schema, &value, "");
    // The selector schema is the one Kubernetes uses.
    let spec = &schema.properties.as_ref().expect("properties")["spec"];
    let subject = &spec.properties.as_ref().expect("spec")["subject"];
    let ns = &subject.properties.as_ref().expect("subject")["namespaces"];
    let keys: BTreeSet<&str> = ns
        .properties
        .as_ref()
        .expect("selector")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["matchExpressions", "matchLabels"]));
}
