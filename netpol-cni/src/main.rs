//! `netpol-cni`: the chained CNI plugin (spec 1.1.0; 1.0.0, 0.4.0 and
//! 0.3.x configurations too, as flannel writes them).
//!
//! ADD reads the pod's host interface and addresses from the main
//! plugin's result (`prevResult`) and the pod from `CNI_ARGS`, asks the
//! node's agent to bind and program the pod, and prints `prevResult`
//! unchanged once the agent says the pod's policy is in the kernel. An
//! agent that does not answer in time fails the ADD (code 11, "try again
//! later"): the runtime tears the sandbox down and retries, and no
//! container of the pod runs meanwhile. Before failing, it sets the pod's
//! host veth down, so that not even the sandbox passes a packet until
//! the runtime deletes it. DEL tells the agent to forget the
//! pod's connections at once; it succeeds without an agent (the veth goes
//! with the sandbox, and the next agent sweeps what is left).
use std::{io::Read as _, net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use netpol_cni::protocol::{self, Attachment, PodRef, Reply, Request};
use serde_json::{Value, json};

/// Versions whose configurations this plugin reads.
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long DEL, CHECK, STATUS and GC wait for the agent: none of them
/// is worth holding a pod's teardown for.
const SHORT: Duration = Duration::from_secs(2);

/// A CNI error: printed as the spec's error object.
struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

fn main() -> ExitCode {
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let config: Value = serde_json::from_str(&stdin).unwrap_or(Value::Null);
    let version = config
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.1.0")
        .to_owned();
    match run(&config, &stdin) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => {
            println!(
                "{}",
                json!({ "cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details })
            );
            ExitCode::FAILURE
        }
    }
}

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| fail(4, format!("{name} is not set"), ""))
}

fn run(config: &Value, stdin: &str) -> Result<Option<String>, Failure> {
    let command = env("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(
            json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED }).to_string(),
        ));
    }
    if config.is_null() {
        return Err(fail(
            6,
            "the configuration on stdin is not JSON",
            stdin.to_owned(),
        ));
    }
    let version = config
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !SUPPORTED.contains(&version) {
        return Err(fail(
            1,
            format!("cniVersion {version:?} is not supported"),
            format!("supported: {SUPPORTED:?}"),
        ));
    }
    let socket = PathBuf::from(
        config
            .get("socket")
            .and_then(Value::as_str)
            .unwrap_or(netpol_cni::DEFAULT_SOCKET),
    );
    let timeout_ms = config
        .get("timeoutMs")
        .and_then(Value::as_u64)
        .unwrap_or(netpol_cni::DEFAULT_TIMEOUT_MS);
    match command.as_str() {
        "ADD" => add(config, &socket, timeout_ms).map(Some),
        "DEL" => {
            let attachment = attachment()?;
            // Best effort: see the module's doc.
            if let Err(e) = ask(&socket, &Request::Del { attachment }, SHORT) {
                eprintln!("netpol-cni: DEL: {}", e.msg);
            }
            Ok(None)
        }
        "CHECK" => {
            let attachment = attachment()?;
            ask(&socket, &Request::Check { attachment }, SHORT)?;
            Ok(None)
        }
        "STATUS" => ask(&socket, &Request::Status, SHORT)
            .map(|()| None)
            .map_err(|e| fail(50, "the node's netpol agent is not available", e.msg)),
        "GC" => {
            let valid = config
                .get("cni.dev/valid-attachments")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| {
                            Some(Attachment {
                                container_id: v.get("containerID")?.as_str()?.to_owned(),
                                ifname: v.get("ifname")?.as_str()?.to_owned(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let Err(e) = ask(&socket, &Request::Gc { valid }, SHORT) {
                eprintln!("netpol-cni: GC: {}", e.msg);
            }
            Ok(None)
        }
        other => Err(fail(4, format!("unknown CNI_COMMAND {other:?}"), "")),
    }
}

fn attachment() -> Result<Attachment, Failure> {
    Ok(Attachment {
        container_id: env("CNI_CONTAINERID")?,
        ifname: env("CNI_IFNAME")?,
    })
}

/// `CNI_ARGS`' `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and `K8S_POD_UID`.
fn pod_ref(args: &str) -> Option<PodRef> {
    let get = |key: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
            .filter(|v| !v.is_empty())
    };
    Some(PodRef {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID"),
    })
}

fn add(config: &Value, socket: &std::path::Path, timeout_ms: u64) -> Result<String, Failure> {
    let Some(prev) = config.get("prevResult") else {
        return Err(fail(
            7,
            "netpol-cni is a chained plugin: it needs the main plugin's result (put it after \
             the main plugin in a conflist)",
            "",
        ));
    };
    let attachment = attachment()?;
    let Some(pod) = pod_ref(&std::env::var("CNI_ARGS").unwrap_or_default()) else {
        // Not a Kubernetes pod: nothing to enforce.
        return Ok(prev.to_string());
    };
    let (host_interfaces, ips) = interfaces(prev);
    let req = Request::Add {
        attachment,
        pod: pod.clone(),
        netns: env("CNI_NETNS")?,
        host_interfaces: host_interfaces.clone(),
        ips,
        timeout_ms,
    };
    if let Err(e) = ask(socket, &req, Duration::from_millis(timeout_ms)) {
        let downed: Vec<String> = host_interfaces
            .iter()
            .filter(|n| !is_bridge(n))
            .filter_map(|n| match set_down(n) {
                Ok(()) => Some(n.clone()),
                Err(err) => {
                    eprintln!("netpol-cni: setting {n} down: {err}");
                    None
                }
            })
            .collect();
        let named = e.msg.contains(&pod.to_string());
        return Err(Failure {
            msg: if named {
                e.msg.clone()
            } else {
                format!("pod {pod}: {}", e.msg)
            },
            details: format!("host interfaces set down until the sandbox is deleted: {downed:?}"),
            ..e
        });
    }
    Ok(prev.to_string())
}

/// Whether `name` is a bridge (the main plugin's `cni0`, shared by every
/// pod: never set down).
fn is_bridge(name: &str) -> bool {
    let dev = std::path::Path::new("/sys/class/net").join(name);
    !dev.exists() || dev.join("bridge").exists()
}

/// Clears `IFF_UP` on `name` in the plugin's namespace (the node's).
fn set_down(name: &str) -> std::io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`, a
    // valid ifreq that outlives the call. The request's type differs by
    // libc (`as _`).
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's flags member, just written by SIOCGIFFLAGS.
    unsafe {
        req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
    }
    // SAFETY: as above; SIOCSIFFLAGS reads `req`.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &raw const req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name {name:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

/// The host-side interface names (entries without a `sandbox`) and the
/// pod's addresses (those on an interface with one, or on none named) of a
/// CNI result, in any of the supported versions.
fn interfaces(result: &Value) -> (Vec<String>, Vec<IpAddr>) {
    let ifaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let in_sandbox = |i: &Value| {
        i.get("sandbox")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let host = ifaces
        .iter()
        .filter(|i| !in_sandbox(i))
        .filter_map(|i| Some(i.get("name")?.as_str()?.to_owned()))
        .collect();
    let ips = result
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|ip| {
                    ip.get("interface")
                        .and_then(Value::as_u64)
                        .and_then(|n| ifaces.get(usize::try_from(n).ok()?))
                        .is_none_or(in_sandbox)
                })
                .filter_map(|ip| {
                    let a = ip.get("address")?.as_str()?;
                    a.split('/').next()?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    (host, ips)
}

/// One call: an agent out of reach, or one that says no, is a failure
/// with code 11 ("try again later").
fn ask(socket: &std::path::Path, req: &Request, timeout: Duration) -> Result<(), Failure> {
    match protocol::call(socket, req, timeout) {
        Ok(Reply::Ok) => Ok(()),
        Ok(Reply::Error { message }) => Err(fail(11, message, "")),
        Err(e) => Err(fail(11, e.to_string(), "")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_name_the_pod_as_containerd_passes_them() {
        let p = pod_ref(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        )
        .unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("ns", "web-0"));
        assert_eq!(p.uid.as_deref(), Some("u-1"));
        assert_eq!(pod_ref("IgnoreUnknown=1;K8S_POD_NAME=x"), None);
    }

    #[test]
    fn the_bridge_plugins_result_gives_host_interfaces_and_pod_addresses() {
        // What Debian's bridge plugin (1.0.0) prints, dual-stack.
        let r: Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
              "interfaces":[{"name":"cni0","mac":"aa"},{"name":"veth1234","mac":"bb"},
                            {"name":"eth0","mac":"cc","sandbox":"/var/run/netns/cni-1"}],
              "ips":[{"interface":2,"address":"10.42.0.5/24","gateway":"10.42.0.1"},
                     {"interface":2,"address":"fd00:42::5/64","gateway":"fd00:42::1"}]}"#,
        )
        .unwrap();
        let (host, ips) = interfaces(&r);
        assert_eq!(host, ["cni0", "veth1234"]);
        assert_eq!(
            ips,
            [
                "10.42.0.5".parse::<IpAddr>().unwrap(),
                "fd00:42::5".parse().unwrap()
            ]
        );
        // 0.3.1: the same fields, plus "version".
        let old: Value = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","interfaces":[{"name":"vethx"},{"name":"eth0","sandbox":"/n"}],
                "ips":[{"version":"4","interface":1,"address":"10.0.0.9/24"},
                       {"version":"4","interface":0,"address":"10.9.9.9/24"}]}"#,
        )
        .unwrap();
        let (host, ips) = interfaces(&old);
        assert_eq!(host, ["vethx"]);
        assert_eq!(
            ips,
            ["10.0.0.9".parse::<IpAddr>().unwrap()],
            "a host address is not the pod's"
        );
    }
}
