//! Loading the kube-router-style baseline ([`super::generate`]'s texts) into
//! the calling thread's network namespace, as kube-router does on every
//! sync: `iptables-save`, `ipset restore` per family, then
//! `iptables-restore` and `ip6tables-restore` of the filter table, each fed
//! on stdin. Shared by the baseline test and the control and throughput
//! benches. Refuses to touch the host's namespace.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{Baseline, empty_filter_table};

/// Which iptables the rules go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy-restore`: x_tables blobs, replaced whole per table.
    Legacy,
    /// `iptables-nft-restore`: the same rules translated to nftables.
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    pub const fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    fn tool(self, v6: bool, what: &str) -> String {
        let ip = if v6 { "ip6tables" } else { "iptables" };
        format!("{ip}-{}-{what}", self.name())
    }
}

/// Time of each step of one sync.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncTimes {
    pub save: Duration,
    pub ipset: Duration,
    pub iptables: Duration,
}

impl SyncTimes {
    pub fn total(&self) -> Duration {
        self.save + self.ipset + self.iptables
    }
}

/// Whether the calling thread shares its network namespace with the
/// process that started us (cargo, in the host's namespace), where
/// restoring would replace the machine's own rules. pid 1's namespace is
/// not readable everywhere (containers); the parent's is.
fn in_host_netns() -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let parent = format!("/proc/{}/ns/net", std::os::unix::process::parent_id());
    match (ino("/proc/thread-self/ns/net"), ino(&parent)) {
        (Ok(a), Ok(b)) => a == b,
        // Unknown: assume the worst.
        _ => true,
    }
}

fn feed(program: &str, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    // Written from a thread: a tool that fails early stops reading, and a
    // full pipe would block us.
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn save(program: &str) -> Result<String, String> {
    let out = Command::new(program)
        .args(["-t", "filter"])
        .output()
        .map_err(|e| format!("starting {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One full sync of `b` into the calling thread's netns.
pub fn sync(b: &Baseline, backend: Backend) -> Result<SyncTimes, String> {
    if in_host_netns() {
        return Err(
            "refusing to restore iptables and ipsets in the host's network namespace".into(),
        );
    }
    let mut t = SyncTimes::default();
    // kube-router reads the table first to keep rules that are not its
    // own; in a private namespace there are none, but the read is part of
    // every sync.
    let start = Instant::now();
    save(&backend.tool(false, "save"))?;
    save(&backend.tool(true, "save"))?;
    t.save = start.elapsed();
    let start = Instant::now();
    feed("ipset", &["restore"], &b.v4.ipset)?;
    feed("ipset", &["restore"], &b.v6.ipset)?;
    t.ipset = start.elapsed();
    let start = Instant::now();
    feed(&backend.tool(false, "restore"), &[], &b.v4.iptables)?;
    feed(&backend.tool(true, "restore"), &[], &b.v6.iptables)?;
    t.iptables = start.elapsed();
    Ok(t)
}

/// Removes every rule and set of a baseline from the calling thread's
/// netns (both backends: whichever was used).
pub fn clear() -> Result<(), String> {
    if in_host_netns() {
        return Err("refusing to clear iptables and ipsets in the host's network namespace".into());
    }
    for backend in Backend::ALL {
        for v6 in [false, true] {
            feed(&backend.tool(v6, "restore"), &[], empty_filter_table())?;
        }
    }
    // Unreferenced now, so they can go (`destroy` without a name: all of
    // this namespace's sets).
    let out = Command::new("ipset")
        .arg("destroy")
        .output()
        .map_err(|e| format!("starting ipset: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ipset destroy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
