//! The start-up check over a fake root: each missing requirement is
//! reported, all of them together.
use std::path::Path;

use netpol_agent::preflight::{Missing, check};

const ALL_CAPS: &str = "000001ffffffffff";
/// CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_RESOURCE only.
const LEAST_CAPS: &str = "000000c001001000";

struct Fake {
    dir: std::path::PathBuf,
}

impl Fake {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("netpol-preflight-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = Self { dir };
        f.write("proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        f.write("sys/kernel/btf/vmlinux", "btf");
        f.write(
            "proc/self/mounts",
            "sysfs /sys sysfs rw 0 0\nbpffs /sys/fs/bpf bpf rw,relatime,mode=700 0 0\n",
        );
        f.write("proc/filesystems", "nodev\tsysfs\nnodev\tbpf\n\text4\n");
        f.caps(LEAST_CAPS);
        f
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn remove(&self, rel: &str) {
        std::fs::remove_file(self.dir.join(rel)).unwrap();
    }

    fn caps(&self, eff: &str) {
        self.write(
            "proc/self/status",
            &format!(
                "Name:\tnetpol-agent\nCapInh:\t0000000000000000\nCapPrm:\t{eff}\nCapEff:\t{eff}\n"
            ),
        );
    }

    fn check(&self) -> Vec<Missing> {
        check(&self.dir, Path::new("/sys/fs/bpf"))
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_complete_node_passes_with_the_least_capabilities() {
    let f = Fake::new("ok");
    assert_eq!(f.check(), []);
    f.caps(ALL_CAPS);
    assert_eq!(f.check(), []);
}

#[test]
fn an_old_kernel_is_reported() {
    let f = Fake::new("kernel");
    f.write("proc/sys/kernel/osrelease", "5.4.0-150-generic\n");
    // 5.4 has no CAP_BPF: the least set does not do there either.
    let m = f.check();
    assert!(
        m.contains(&Missing::Kernel {
            found: "5.4.0-150-generic".into()
        }),
        "{m:?}"
    );
    assert!(
        m.iter().any(
            |x| matches!(x, Missing::Capabilities { missing } if missing.contains(&"CAP_SYS_ADMIN"))
        ),
        "{m:?}"
    );
    f.remove("proc/sys/kernel/osrelease");
    assert!(f.check().contains(&Missing::Kernel {
        found: "unreadable".into()
    }));
}

#[test]
fn a_kernel_without_clsact_is_reported() {
    let f = Fake::new("clsact");
    f.write("proc/sys/kernel/osrelease", "4.4.0\n");
    assert!(
        f.check()
            .iter()
            .any(|m| matches!(m, Missing::Clsact { .. }))
    );
    let f = Fake::new("clsact-config");
    f.write(
        "boot/config-6.1.0-18-amd64",
        "CONFIG_NET_SCHED=y\n# CONFIG_NET_SCH_INGRESS is not set\n",
    );
    let m = f.check();
    assert!(matches!(m.as_slice(), [Missing::Clsact { .. }]), "{m:?}");
    f.write("boot/config-6.1.0-18-amd64", "CONFIG_NET_SCH_INGRESS=m\n");
    assert_eq!(f.check(), []);
}

#[test]
fn missing_btf_is_reported() {
    let f = Fake::new("btf");
    f.remove("sys/kernel/btf/vmlinux");
    let m = f.check();
    assert!(matches!(m.as_slice(), [Missing::Btf { .. }]), "{m:?}");
}

#[test]
fn an_unmounted_bpffs_is_reported_unless_the_agent_can_mount_it() {
    let f = Fake::new("bpffs");
    f.write("proc/self/mounts", "sysfs /sys sysfs rw 0 0\n");
    let m = f.check();
    assert!(matches!(m.as_slice(), [Missing::Bpffs { .. }]), "{m:?}");
    // With CAP_SYS_ADMIN the agent mounts it itself.
    f.caps(ALL_CAPS);
    assert_eq!(f.check(), []);
    // Not even known to the kernel.
    f.write("proc/filesystems", "nodev\tsysfs\n");
    assert!(matches!(f.check().as_slice(), [Missing::Bpffs { .. }]));
}

#[test]
fn missing_capabilities_are_named() {
    let f = Fake::new("caps");
    f.caps("0000000000001000"); // CAP_NET_ADMIN only
    let m = f.check();
    assert_eq!(
        m,
        [Missing::Capabilities {
            missing: vec!["CAP_BPF", "CAP_PERFMON"]
        }]
    );
    // CAP_SYS_RESOURCE matters where BPF memory counts against memlock.
    f.write("proc/sys/kernel/osrelease", "5.10.0-28-amd64\n");
    let m = f.check();
    assert_eq!(
        m,
        [Missing::Capabilities {
            missing: vec!["CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE"]
        }]
    );
    // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
    f.caps("0000000001201000");
    assert_eq!(f.check(), []);
}

#[test]
fn everything_missing_is_reported_at_once() {
    let f = Fake::new("all");
    f.write("proc/sys/kernel/osrelease", "4.4.0\n");
    f.remove("sys/kernel/btf/vmlinux");
    f.write("proc/self/mounts", "");
    f.caps("0000000000000000");
    let m = f.check();
    assert_eq!(m.len(), 5, "{m:?}");
    let err = netpol_agent::preflight::PreflightError { missing: m }.to_string();
    for word in ["kernel 5.10", "clsact", "BTF", "bpffs", "CAP_NET_ADMIN"] {
        assert!(err.contains(word), "{err}");
    }
}
