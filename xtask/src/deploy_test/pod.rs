//! A pod's container as the kubelet would run it, as `podman run`
//! arguments: what the rendered manifest says, field by field. A field
//! this does not know how to honour is an error, not skipped: a manifest
//! change the test cannot run must fail it.
//!
//! The node is a network namespace (hostNetwork) and a folder standing for
//! its root filesystem: a hostPath is found under that folder, except
//! kernel-wide paths every node of this machine shares ([`KERNEL_WIDE`]).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Volume};

/// hostPaths that are the kernel's, not a node's files: the cgroup
/// hierarchy, and the network namespaces the runtime pins (the pods'
/// namespaces live there).
pub const KERNEL_WIDE: [&str; 2] = ["/sys/fs/cgroup", "/run/netns"];

/// Where the kubelet mounts a pod's service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Podman's global flags for this machine (see the brief): runc (crun
/// refuses this host's hybrid cgroups) and cgroupfs.
pub const PODMAN: [&str; 2] = ["--runtime=runc", "--cgroup-manager=cgroupfs"];

/// `run`'s limits: no higher than root here may set (it lacks
/// CAP_SYS_RESOURCE).
pub const LIMITS: [&str; 2] = ["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"];

/// The node a pod runs on.
#[derive(Clone, Debug)]
pub struct Node {
    /// `spec.nodeName`.
    pub name: String,
    /// `status.hostIP`.
    pub host_ip: std::net::IpAddr,
    /// Its network namespace (hostNetwork pods join it).
    pub netns: PathBuf,
    /// The folder standing for its `/`.
    pub root: PathBuf,
    /// The API server as the kubelet tells pods (KUBERNETES_SERVICE_HOST,
    /// KUBERNETES_SERVICE_PORT).
    pub api: std::net::SocketAddr,
    /// The service account's token, CA and namespace files.
    pub service_account: PathBuf,
}

impl Node {
    /// The node's file at `host_path` (a hostPath volume's path).
    pub fn host_file(&self, host_path: &str) -> PathBuf {
        host_file(&self.root, host_path)
    }
}

/// The file at `host_path` of the node whose root folder is `root`.
pub fn host_file(root: &Path, host_path: &str) -> PathBuf {
    if KERNEL_WIDE
        .iter()
        .any(|k| Path::new(host_path).starts_with(k))
    {
        PathBuf::from(host_path)
    } else {
        root.join(host_path.trim_start_matches('/'))
    }
}

/// `podman run` arguments (after `run`) for container `c` of
/// `pod`, named `name`, from `image`; `detach` for a long-running one.
pub fn run_args(
    pod: &PodSpec,
    c: &Container,
    node: &Node,
    image: &str,
    name: &str,
    detach: bool,
) -> Result<Vec<String>> {
    let what = format!("container {}", c.name);
    let mut a: Vec<String> = vec!["--name".into(), name.into()];
    a.extend(LIMITS.iter().map(|s| (*s).to_owned()));
    if detach {
        a.push("--detach".into());
    } else {
        a.push("--rm".into());
    }
    ensure!(
        pod.host_network == Some(true),
        "{what}: only hostNetwork pods are run here"
    );
    a.push(format!("--network=ns:{}", node.netns.display()));
    // The kubelet gives a container no writable /tmp or /run of its own
    // beside its mounts; podman's default --read-only adds them.
    a.push("--read-only-tmpfs=false".into());
    pod_security(pod, &mut a)?;
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        a.push("--privileged".into());
    }
    if let Some(caps) = &sc.capabilities {
        for d in caps.drop.iter().flatten() {
            a.push(format!("--cap-drop={d}"));
        }
        for c in caps.add.iter().flatten() {
            a.push(format!("--cap-add={c}"));
        }
    }
    if sc.read_only_root_filesystem == Some(true) {
        a.push("--read-only".into());
    }
    if sc.allow_privilege_escalation == Some(false) {
        a.push("--security-opt=no-new-privileges".into());
    }
    if let Some(uid) = sc.run_as_user {
        a.push(format!("--user={uid}"));
    }
    ensure!(
        sc.run_as_group.is_none()
            && sc.run_as_non_root.is_none()
            && sc.se_linux_options.is_none()
            && sc.app_armor_profile.is_none()
            && sc.seccomp_profile.is_none()
            && sc.proc_mount.is_none(),
        "{what}: a container securityContext field this test does not run"
    );

    let env = env_of(c, node)?;
    for (k, v) in &env {
        a.push(format!("--env={k}={v}"));
    }
    if pod.service_account_name.is_some() && pod.automount_service_account_token != Some(false) {
        a.push(format!(
            "--volume={}:{SERVICE_ACCOUNT_DIR}:ro",
            node.service_account.display()
        ));
    }
    let volumes: BTreeMap<&str, &Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes
            .get(m.name.as_str())
            .with_context(|| format!("{what}: mount of an unknown volume {}", m.name))?;
        let hp = v
            .host_path
            .as_ref()
            .with_context(|| format!("{what}: volume {} is not a hostPath", v.name))?;
        ensure!(m.sub_path.is_none(), "{what}: subPath is not run here");
        let src = node.host_file(&hp.path);
        match hp.type_.as_deref() {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&src)
                .with_context(|| format!("creating {}", src.display()))?,
            Some("Directory") => ensure!(src.is_dir(), "{}: no such folder", src.display()),
            None | Some("") => {}
            Some(other) => bail!("{what}: hostPath type {other} is not run here"),
        }
        let mut opts = Vec::new();
        if m.read_only == Some(true) {
            opts.push("ro");
        }
        match m.mount_propagation.as_deref() {
            None | Some("None") => {}
            Some("HostToContainer") => opts.push("rslave"),
            Some("Bidirectional") => opts.push("rshared"),
            Some(other) => bail!("{what}: mountPropagation {other}"),
        }
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!(":{}", opts.join(","))
        };
        a.push(format!("--volume={}:{}{opts}", src.display(), m.mount_path));
    }
    // hostNetwork: a hostPort is the containerPort on the node already.
    for p in c.ports.iter().flatten() {
        ensure!(
            p.host_port.is_none_or(|h| h == p.container_port),
            "{what}: hostPort {:?} differs from containerPort {}",
            p.host_port,
            p.container_port
        );
    }
    if let Some(cmd) = c.command.as_deref() {
        let (first, rest) = cmd
            .split_first()
            .with_context(|| format!("{what}: empty command"))?;
        a.push(format!("--entrypoint={first}"));
        a.push(image.into());
        a.extend(rest.iter().map(|s| expand(s, &env)));
    } else {
        a.push(image.into());
    }
    a.extend(c.args.iter().flatten().map(|s| expand(s, &env)));
    Ok(a)
}

/// The pod's securityContext as podman's: AppArmor and SELinux.
fn pod_security(pod: &PodSpec, a: &mut Vec<String>) -> Result<()> {
    // The kubelet runs a container without a seccomp profile unless one is
    // named (the `SeccompDefault` feature is off by default); podman would
    // apply its own, which refuses bpf(2) without CAP_SYS_ADMIN.
    let seccomp = pod
        .security_context
        .as_ref()
        .and_then(|sc| sc.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    match seccomp {
        None | Some("Unconfined") => a.push("--security-opt=seccomp=unconfined".into()),
        Some("RuntimeDefault") => {}
        Some(other) => bail!("seccompProfile {other} is not run here"),
    }
    let Some(sc) = &pod.security_context else {
        return Ok(());
    };
    if let Some(p) = &sc.app_armor_profile {
        match p.type_.as_str() {
            "Unconfined" => a.push("--security-opt=apparmor=unconfined".into()),
            "RuntimeDefault" => {}
            other => bail!("appArmorProfile {other} is not run here"),
        }
    }
    if let Some(o) = &sc.se_linux_options {
        ensure!(
            o.user.is_none() && o.role.is_none() && o.level.is_none(),
            "seLinuxOptions beyond type are not run here"
        );
        if let Some(t) = &o.type_ {
            a.push(format!("--security-opt=label=type:{t}"));
        }
    }
    Ok(())
}

/// The container's environment as the kubelet sets it: its `env` (values
/// and the downward API fields a node knows), and the API server's
/// service variables.
fn env_of(c: &Container, node: &Node) -> Result<Vec<(String, String)>> {
    let mut out = vec![
        (
            "KUBERNETES_SERVICE_HOST".to_owned(),
            node.api.ip().to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".to_owned(),
            node.api.port().to_string(),
        ),
    ];
    for EnvVar {
        name,
        value,
        value_from,
    } in c.env.iter().flatten()
    {
        let v = match (value, value_from) {
            (Some(v), None) => expand(v, &out),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .with_context(|| format!("env {name}: only fieldRef is run here"))?;
                match field.field_path.as_str() {
                    "spec.nodeName" => node.name.clone(),
                    "status.hostIP" => node.host_ip.to_string(),
                    other => bail!("env {name}: fieldRef {other} is not run here"),
                }
            }
            _ => bail!("env {name}: neither a value nor a fieldRef"),
        };
        out.push((name.clone(), v));
    }
    Ok(out)
}

/// Kubernetes' `$(VAR)` expansion of command, args and env values: a
/// defined variable is replaced, `$$` is `$`, anything else stays.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| *k == body[..end])
        {
            out.push_str(v);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            name: "n1".into(),
            host_ip: "192.0.2.7".parse().unwrap(),
            netns: "/run/netns/n1".into(),
            root: "/tmp/root-n1".into(),
            api: "192.0.2.7:6443".parse().unwrap(),
            service_account: "/tmp/sa".into(),
        }
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let env = vec![("HOST_IP".to_owned(), "fd00::7".to_owned())];
        assert_eq!(
            expand("--listen=[$(HOST_IP)]:9101", &env),
            "--listen=[fd00::7]:9101"
        );
        assert_eq!(
            expand("$(NOPE) $$(HOST_IP) $", &env),
            "$(NOPE) $(HOST_IP) $"
        );
    }

    #[test]
    fn host_paths_are_the_nodes_but_kernel_wide_ones() {
        let n = node();
        assert_eq!(
            n.host_file("/sys/fs/bpf"),
            PathBuf::from("/tmp/root-n1/sys/fs/bpf")
        );
        assert_eq!(n.host_file("/run/netns"), PathBuf::from("/run/netns"));
        assert_eq!(
            n.host_file("/sys/fs/cgroup"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn the_agent_container_runs_as_the_manifest_says() {
        let pod: PodSpec = serde_yaml::from_str(
            r#"
hostNetwork: true
serviceAccountName: sa
securityContext: {appArmorProfile: {type: Unconfined}, seLinuxOptions: {type: spc_t}}
containers:
  - name: agent
    image: img
    args: [run, "--listen=[$(HOST_IP)]:9101"]
    env:
      - {name: HOST_IP, valueFrom: {fieldRef: {fieldPath: status.hostIP}}}
      - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    securityContext:
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      runAsUser: 0
      capabilities: {drop: [ALL], add: [BPF]}
    volumeMounts:
      - {name: netns, mountPath: /run/netns, readOnly: true, mountPropagation: HostToContainer}
volumes:
  - {name: netns, hostPath: {path: /run/netns}}
"#,
        )
        .unwrap();
        let a = run_args(&pod, &pod.containers[0], &node(), "img:1", "x", true).unwrap();
        for want in [
            "--network=ns:/run/netns/n1",
            "--security-opt=apparmor=unconfined",
            "--security-opt=label=type:spc_t",
            "--cap-drop=ALL",
            "--cap-add=BPF",
            "--read-only",
            "--security-opt=no-new-privileges",
            "--user=0",
            "--env=HOST_IP=192.0.2.7",
            "--env=NODE_NAME=n1",
            "--env=KUBERNETES_SERVICE_HOST=192.0.2.7",
            "--volume=/tmp/sa:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            "--volume=/run/netns:/run/netns:ro,rslave",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        let tail: Vec<&str> = a.iter().rev().take(3).rev().map(String::as_str).collect();
        assert_eq!(tail, ["img:1", "run", "--listen=[192.0.2.7]:9101"]);
    }

    #[test]
    fn a_field_the_test_cannot_run_fails_it() {
        let pod: PodSpec = serde_yaml::from_str(
            "hostNetwork: true\ncontainers: [{name: c, env: [{name: X, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}]}]",
        )
        .unwrap();
        let e = run_args(&pod, &pod.containers[0], &node(), "img", "x", false).unwrap_err();
        assert!(e.to_string().contains("metadata.uid"), "{e}");
        let pod: PodSpec =
            serde_yaml::from_str("hostNetwork: false\ncontainers: [{name: c}]").unwrap();
        assert!(run_args(&pod, &pod.containers[0], &node(), "img", "x", false).is_err());
    }
}
