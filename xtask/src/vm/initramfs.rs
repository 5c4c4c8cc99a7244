//! The guest's root: a newc cpio archive (what the kernel unpacks into its
//! rootfs) with a static busybox, the host's iproute2, bpftool and ping
//! with their shared libraries, the eBPF object, the test binaries (and
//! theirs),
//! each kernel's modules and `/init`, which runs the suites and reports on
//! the second serial port.
use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use super::kernel::{Kernel, MODULES};

/// Where `/init` writes; the host reads it from the second serial port.
pub const RESULTS_TTY: &str = "/dev/ttyS1";
/// Every line `/init` writes itself starts with this.
pub const MARK: &str = "@@netpol-vm";
/// Where the eBPF object is in the guest (`NETPOL_EBPF_OBJECT`).
const OBJECT: &str = "/netpol-ebpf.o";

/// Dynamically linked host tools the tests run, with their libraries. The
/// tests find them through `PATH`, ahead of busybox's applets of the same
/// names (busybox's `ip` has no `netns`).
const HOST_TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/bpftool",
    "/usr/bin/ping",
];

/// Writes the archive for `kernels` running `suites` (name, binary)
/// without the tests `skip` names (libtest `--skip` filters), or only
/// those whose names contain `only`.
pub fn build(
    dest: &Path,
    busybox: &Path,
    object: &Path,
    suites: &[(String, PathBuf)],
    skip: &[&str],
    only: Option<&str>,
    kernels: &[Kernel],
) -> Result<()> {
    // The filter goes into the guest's shell script as one word.
    if let Some(f) = only {
        ensure!(
            !f.is_empty()
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "--only {f:?}: a test name's letters, digits, '_' and ':' only"
        );
    }
    let file = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/etc",
        "/root",
        "/var",
        "/tests",
    ] {
        cpio.dir(dir)?;
    }
    cpio.symlink("/var/run", "../run")?;
    cpio.file("/bin/busybox", busybox, 0o755)?;
    for tool in HOST_TOOLS {
        cpio.file(tool, Path::new(tool), 0o755)?;
        for lib in shared_libraries(Path::new(tool))? {
            let at = lib.to_string_lossy().into_owned();
            cpio.file(&at, &lib, 0o755)?;
        }
    }
    cpio.file(OBJECT, object, 0o644)?;
    for (name, binary) in suites {
        cpio.file(&format!("/tests/{name}"), binary, 0o755)?;
        for lib in shared_libraries(binary)? {
            let at = lib.to_string_lossy().into_owned();
            cpio.file(&at, &lib, 0o755)?;
        }
    }
    for k in kernels {
        for (name, path) in MODULES.iter().zip(&k.modules) {
            cpio.file(&format!("/modules/{}/{name}.ko", k.release), path, 0o644)?;
        }
    }
    cpio.data("/init", init_script(skip, only).as_bytes(), 0o755)?;
    cpio.finish()
}

/// The kernel command-line word naming the suites to run, comma-separated
/// (the kernel hands `NAME=value` words it does not know to `/init` as
/// environment variables).
pub const SUITES_PARAM: &str = "NETPOL_SUITES";
/// The kernel command-line word giving the suites' `--test-threads`: the
/// guest's vCPUs, so that tests run side by side only on CPUs of their
/// own.
pub const THREADS_PARAM: &str = "NETPOL_TEST_THREADS";

/// `/init`: mounts, loads the modules of the running kernel, runs each
/// suite of [`SUITES_PARAM`] with its output on [`RESULTS_TTY`] between
/// marker lines, powers off. The kernel's own console (ttyS0) stays apart.
/// `NETPOL_VM_GUEST=1` tells a test it runs in the emulated guest, where
/// the host's load can starve it. `skip` are libtest `--skip` filters
/// for every suite.
fn init_script(skip: &[&str], only: Option<&str>) -> String {
    let modules = MODULES.join(" ");
    let mut skip: String = skip.iter().map(|s| format!(" --skip {s}")).collect();
    if let Some(f) = only {
        skip.push_str(&format!(" {f}"));
    }
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
export NETPOL_EBPF_OBJECT={OBJECT} NETPOL_VM_GUEST=1 RUST_BACKTRACE=0
out={RESULTS_TTY}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /sys/fs/bpf /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
release=$(uname -r)
echo "{MARK} kernel $release clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)" > $out
for m in {modules}; do
  insmod /modules/$release/$m.ko > $out 2>&1 || echo "{MARK} insmod $m failed" > $out
done
ip link set lo up
for t in $(echo "${SUITES_PARAM}" | tr , ' '); do
  echo "{MARK} begin $t" > $out
  start=$(cut -d' ' -f1 /proc/uptime)
  /tests/$t --test-threads=${THREADS_PARAM}{skip} > $out 2>&1
  rc=$?
  echo "{MARK} end $t rc=$rc start=$start end=$(cut -d' ' -f1 /proc/uptime)" > $out
done
echo "{MARK} done" > $out
sync
poweroff -f
"#
    )
}

/// The libraries `ldd` lists for a dynamic binary, the loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    ensure!(
        out.status.success(),
        "ldd {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = l.split_whitespace().find(|w| w.starts_with('/'))?;
            Some(PathBuf::from(path))
        })
        .collect())
}

/// A newc ("070701") cpio writer: parent folders first, each once; a
/// file copied from the host once (libraries the tools share).
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
    copied: BTreeSet<String>,
    written: u64,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            dirs: BTreeSet::new(),
            copied: BTreeSet::new(),
            written: 0,
        }
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        self.parents(path)?;
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, 0o040_755, &[])?;
        }
        Ok(())
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            let parent = &path[..at + 1 + i];
            if self.dirs.insert(parent.to_owned()) {
                self.entry(parent, 0o040_755, &[])?;
            }
            at += 1 + i;
        }
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parents(path)?;
        self.entry(path, 0o120_777, target.as_bytes())
    }

    fn file(&mut self, path: &str, source: &Path, mode: u32) -> Result<()> {
        if !self.copied.insert(path.to_owned()) {
            return Ok(());
        }
        let data =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        self.data(path, &data, mode)
    }

    fn data(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.parents(path)?;
        self.entry(path, 0o100_000 | mode, data)
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let name = path.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let size = u32::try_from(data.len()).context("file over 4 GiB")?;
        let namesize = u32::try_from(name.len() + 1).context("name too long")?;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0,
        ];
        self.ino += 1;
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..usize::try_from(n)?])
    }

    fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_with_parents_first_and_aligned() {
        let mut buf = Vec::new();
        let mut c = Cpio::new(&mut buf);
        c.data("/a/b/f", b"hello", 0o644).expect("entry");
        c.finish().expect("trailer");
        let text = String::from_utf8_lossy(&buf);
        let names: Vec<&str> = ["a\0", "a/b\0", "a/b/f\0", "TRAILER!!!\0"]
            .into_iter()
            .filter(|n| text.contains(n))
            .collect();
        assert_eq!(names.len(), 4, "{text}");
        assert!(text.find("a/b\0") < text.find("a/b/f\0"));
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
    }
}
