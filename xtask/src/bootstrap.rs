//! Installs what the build and the tests need, when it is missing.
//!
//! - the nightly's `rust-src` (for `-Z build-std=core`), from rustup or, if
//!   rustup cannot fetch it, from `../shared/toolchain`;
//! - `bpf-linker` 0.13, built against the nightly's own libLLVM through a
//!   prefix folder that must outlive the build (its RUNPATH points there);
//! - Debian tools: for the demo (and the conformance harness) iproute2 and
//!   iptables only ([`demo_tools`]); for the privileged tests and benches
//!   bpftool, ping and ipset besides ([`debian_tools`]);
//! - for `vm-test`: qemu, a static busybox, and the decompressors of
//!   Debian's kernel images and modules ([`vm_tools`]).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::run;

/// The bpf-linker release that builds against LLVM 22 on rustc 1.95.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// What the demo and the conformance harness run: network namespaces
/// and kube-proxy-style DNAT. Debian packages, each with a binary that
/// shows it is installed.
const DEMO_TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("iptables-restore", "iptables")];
/// What the privileged tests and the benches run besides.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ping", "iputils-ping"),
    // The kube-router-style baseline of `bench control` and `throughput`.
    ("ipset", "ipset"),
    // The CNI chain netpol-cni's tests run (bridge, host-local, portmap).
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
];

/// What `vm-test` needs beyond [`DEBIAN_TOOLS`], each with a binary that
/// shows it is installed. busybox is checked apart: it must be the static
/// build.
const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("dpkg-deb", "dpkg"),
    // Strips the test binaries the guest runs.
    ("strip", "binutils"),
];

/// What `cargo xtask image` builds with: the static target's standard
/// library, a C compiler for it (ring's C code), and bpftool (copied in).
const IMAGE_TOOLS: &[(&str, &str)] = &[("musl-gcc", "musl-tools"), ("bpftool", "bpftool")];

/// What `cargo xtask deploy-test` runs the image with: podman on runc
/// (crun refuses this host's hybrid cgroups), skopeo to read the archive
/// as a registry client would, curl to write through the API server.
const CONTAINER_TOOLS: &[(&str, &str)] = &[
    ("podman", "podman"),
    ("runc", "runc"),
    ("skopeo", "skopeo"),
    ("curl", "curl"),
];

/// Everything, `vm-test`'s, the image's and the deploy test's tools
/// included (`cargo xtask test` runs it).
pub fn all() -> Result<()> {
    vm_tools()?;
    image_tools()?;
    container_tools()?;
    ebpf_toolchain()
}

/// The musl target (rustup) and [`IMAGE_TOOLS`].
pub fn image_tools() -> Result<()> {
    install_missing("image tools (musl-tools, bpftool)", IMAGE_TOOLS, &[])?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed", "--toolchain", "stable"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == crate::image::MUSL)
    {
        println!("bootstrap: rust target {}: present", crate::image::MUSL);
        return Ok(());
    }
    println!("bootstrap: rust target {}: installing", crate::image::MUSL);
    run(Command::new("rustup").args(["target", "add", crate::image::MUSL, "--toolchain", "stable"]))
}

/// [`CONTAINER_TOOLS`].
pub fn container_tools() -> Result<()> {
    install_missing(
        "container tools (podman, runc, skopeo, curl)",
        CONTAINER_TOOLS,
        &[],
    )
}

/// Nightly with rust-src, and bpf-linker.
pub fn ebpf_toolchain() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("running rustup (is rustup installed?)")?;
    ensure!(
        out.status.success(),
        "the nightly toolchain is not installed (this machine kind ships one; rustup cannot \
         fetch another here): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn rust_src(sysroot: &Path) -> Result<()> {
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.is_file() {
        println!("bootstrap: nightly rust-src: present");
        return Ok(());
    }
    println!("bootstrap: nightly rust-src: installing with rustup");
    let ok = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .is_ok_and(|s| s.success());
    if ok && core.is_file() {
        return Ok(());
    }
    let shared = crate::root().join("../shared/toolchain");
    let archive = std::fs::read_dir(&shared)
        .with_context(|| {
            format!(
                "rustup could not add rust-src and the fallback folder {} is missing",
                shared.display()
            )
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("rust-src-"))
        })
        .with_context(|| format!("no rust-src archive in {}", shared.display()))?;
    println!(
        "bootstrap: nightly rust-src: extracting {}",
        archive.display()
    );
    run(Command::new("sha256sum")
        .args(["--check", "--ignore-missing", "--quiet", "SHA256SUMS"])
        .current_dir(&shared))?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(sysroot.join("lib/rustlib")))?;
    ensure!(
        core.is_file(),
        "rust-src still missing after extracting {}",
        archive.display()
    );
    Ok(())
}

/// Where the LLVM prefix for bpf-linker lives: outside /tmp and target/,
/// because the installed linker loads libLLVM through it at every run.
fn llvm_prefix() -> PathBuf {
    if let Some(p) = std::env::var_os("NETPOL_LLVM_PREFIX") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/netpol/llvm")
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker_works() -> bool {
    Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn bpf_linker(sysroot: &Path) -> Result<()> {
    ensure_on_path(&cargo_bin());
    let prefix = llvm_prefix();
    link_llvm(sysroot, &prefix)?;
    if bpf_linker_works() {
        println!("bootstrap: bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    println!(
        "bootstrap: bpf-linker {BPF_LINKER_VERSION}: building against the nightly's libLLVM \
         (prefix {}; takes a few minutes)",
        prefix.display()
    );
    let mut c = Command::new("rustup");
    c.args(["run", "stable", "cargo", "install", "bpf-linker"])
        .args(["--version", BPF_LINKER_VERSION, "--force"])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    run(&mut c)?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but `bpf-linker --version` fails");
    }
    Ok(())
}

/// `<prefix>/lib/libLLVM.so` and the versioned name, both pointing at the
/// nightly's libLLVM, so bpf-linker links and later loads exactly the LLVM
/// rustc emits bitcode for.
fn link_llvm(sysroot: &Path, prefix: &Path) -> Result<()> {
    let lib = sysroot.join("lib");
    let versioned = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("libLLVM.so.") && !p.is_symlink()
            })
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let dir = prefix.join("lib");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = versioned
        .file_name()
        .context("libLLVM path without a file name")?;
    for link in [dir.join("libLLVM.so"), dir.join(name)] {
        if std::fs::read_link(&link).is_ok_and(|t| t == versioned) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&versioned, &link)
            .with_context(|| format!("linking {} to {}", link.display(), versioned.display()))?;
    }
    Ok(())
}

fn ensure_on_path(dir: &Path) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == dir) {
        return;
    }
    let mut parts = vec![dir.to_path_buf()];
    parts.extend(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(parts) {
        // SAFETY: xtask is single-threaded here; nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The demo's Debian tools (and the conformance harness's), installed
/// with apt-get when any is missing: nothing the demo does not run.
pub fn demo_tools() -> Result<()> {
    install_missing("demo tools (iproute2, iptables)", DEMO_TOOLS, &[])
}

/// Every Debian tool the privileged tests and benches run, installed with
/// apt-get when any is missing.
pub fn debian_tools() -> Result<()> {
    install_missing(
        "Debian tools (bpftool, iproute2, ping, iptables, ipset, CNI plugins)",
        &[DEMO_TOOLS, TEST_TOOLS].concat(),
        &[],
    )
}

/// Installs the packages of `tools` whose binary is missing, and `extra`
/// packages that are; one line either way.
fn install_missing(what: &str, tools: &[(&str, &str)], extra: &[&str]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.extend(extra);
    if missing.is_empty() {
        println!("bootstrap: {what}: present");
        return Ok(());
    }
    println!("bootstrap: {what}: installing {}", missing.join(" "));
    apt_install(&missing)
}

/// The Debian tools, and what `vm-test` needs besides.
pub fn vm_tools() -> Result<()> {
    debian_tools()?;
    let busybox: &[&str] = if static_busybox() {
        &[]
    } else {
        &["busybox-static"]
    };
    install_missing(
        "vm-test tools (qemu, busybox-static, xz, zstd)",
        VM_TOOLS,
        busybox,
    )
}

/// Whether `busybox` is the static build (`busybox-static`), which runs in
/// an initramfs without a libc.
fn static_busybox() -> bool {
    Command::new("sh")
        .args([
            "-c",
            "command -v busybox >/dev/null && ldd \"$(command -v busybox)\" 2>&1",
        ])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("not a dynamic"))
}

fn apt_install(packages: &[&str]) -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "installing {} needs root (apt-get)",
        packages.join(" ")
    );
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}
