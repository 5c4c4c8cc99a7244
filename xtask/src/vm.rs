//! `cargo xtask vm-test`: the datapath tests on the kernels netpol
//! supports, each booted in qemu.
//!
//! The host kernel proves one version; the verifier, BTF map support, the
//! attach path (netlink clsact before 6.6, TCX from 6.6) and
//! `BPF_PROG_TEST_RUN` differ by kernel. So, as aya's own CI does, Debian
//! kernels are booted in qemu (TCG: this machine kind's `/dev/kvm` runs
//! only paravirtualised guests; one vCPU each, as many guests at once as
//! the host has cores to spare) from their ELF `vmlinux` (PVH entry), with
//! a busybox initramfs that runs the datapath test binary (the host's
//! test build, stripped, with its libraries), whose suites are:
//! - `packets`, `hardening`, `services`: the
//!   verdict tables through `BPF_PROG_TEST_RUN`. Before 5.15 it refuses a
//!   non-zero `__sk_buff.ingress_ifindex`: `from_pod` and `leave_node`
//!   (which never read it) run with 0, and a test stops at its first
//!   forwarded packet through `to_pod` (which reads it) and is reported
//!   skipped, by name;
//! - `smoke`: real traffic through this kernel's attach path and
//!   adoption after a simulated agent restart;
//! - `netns`, `attach`: real connections under policy,
//!   and both attach paths where the kernel has them;
//!
//! and not `events` (deny events through the ring buffer), which the
//! kernel matrix has never run ([`SKIP`]).
//!
//! One line per kernel says PASS or FAIL, naming the failed tests and
//! showing the tail of any verifier log, and how many tests were skipped
//! and why (their names on the next line); the full guest output stays in
//! `target/vm/logs/<series>/`.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

mod initramfs;
mod kernel;
mod report;

use kernel::{Kernel, SERIES, Series};

/// The test binaries the guest runs, in order.
const SUITES: &[&str] = &["datapath"];

/// Tests of those binaries the guest leaves out (libtest `--skip`
/// filters).
const SKIP: &[&str] = &["events::"];

/// Kernel from which the agent attaches through TCX.
const TCX_KERNEL: (u32, u32) = (6, 6);

/// How long one guest may run: far beyond a run on a loaded machine (TCG
/// is slow), so that only a hung guest meets it.
const GUEST_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// vCPUs per guest. Each is a host thread that runs flat out under TCG:
/// guests with more vCPUs than the host has cores to spare only take
/// turns, and their tests' timing with them.
const GUEST_CPUS: usize = 1;

/// How many guests run at once: one per core the host has to spare (one
/// stays for the host: qemu's I/O, the xtask, whatever else runs), at
/// least one.
fn guests_at_once(kernels: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (cores.saturating_sub(1) / GUEST_CPUS).clamp(1, kernels.max(1))
}

/// `f` over `items` on at most `n` threads at once, results in order
/// (`None` where `f` panicked).
fn run_at_most<T: Sync, R: Send>(
    n: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..n.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().ok().flatten())
        .collect()
}

/// `target/vm`: kernels, apt state, the stripped suites, logs.
fn vm_dir() -> PathBuf {
    crate::root().join("target").join("vm")
}

/// The series `--kernel` names: one, or `all`.
pub fn select(name: &str) -> Result<Vec<Series>> {
    if name == "all" {
        return Ok(SERIES.to_vec());
    }
    SERIES
        .iter()
        .find(|s| s.name == name)
        .map(|s| vec![*s])
        .with_context(|| {
            format!(
                "unknown kernel {name:?}: {} or all",
                SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            )
        })
}

/// Builds, boots and reports; fails when any kernel fails.
pub fn test(series: &[Series], only: Option<&str>) -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "vm-test fetches kernels with apt-get (private state, but apt wants root): run it as root"
    );
    crate::bootstrap::vm_tools()?;
    let object = crate::build_ebpf()?;
    let suites = build_suites(&vm_dir(), &object)?;
    boot_all(series, &object, &suites, only)
}

/// The suites as built now, for [`boot_all`]; the caller built the object
/// and has the tools.
pub fn suites(object: &Path) -> Result<Vec<(String, PathBuf)>> {
    build_suites(&vm_dir(), object)
}

/// Fetches the kernels, boots each with `suites` and reports; fails when
/// any kernel fails. Builds nothing: it can run beside other work.
/// `only`: run just the tests whose names contain it.
pub fn boot_all(
    series: &[Series],
    object: &Path,
    suites: &[(String, PathBuf)],
    only: Option<&str>,
) -> Result<()> {
    let started = Instant::now();
    let dir = vm_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kernels = kernel::get(&dir, series)?;
    let busybox = static_busybox()?;
    let cpio = dir.join("initramfs.cpio");
    initramfs::build(&cpio, &busybox, object, suites, SKIP, only, &kernels)?;
    let at_once = guests_at_once(kernels.len());
    println!(
        "vm-test: booting {} (qemu TCG, {GUEST_CPUS} vCPU each, {at_once} at a time)",
        kernels
            .iter()
            .map(|k| k.release.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let results = run_at_most(at_once, &kernels, |k| boot(k, &cpio, SUITES))
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("guest thread panicked"))));

    let mut failed = Vec::new();
    for (k, result) in kernels.iter().zip(results) {
        let path = if k.version() >= TCX_KERNEL {
            "TCX"
        } else {
            "netlink"
        };
        let head = format!("vm-test {} ({}, {path})", k.series.name, k.release);
        match result {
            Ok((o, took)) if o.ok() => {
                let (skipped, names) = skips(&o);
                println!(
                    "{head}: PASS, {} tests in {} s{skipped}",
                    o.passed,
                    took.as_secs()
                );
                print!("{names}");
            }
            Ok((o, took)) => {
                let (skipped, _) = skips(&o);
                let mut names: Vec<String> = o.failed.iter().map(|f| f.name.clone()).collect();
                names.extend(
                    o.broken
                        .iter()
                        .map(|b| b.lines().next().unwrap_or_default().to_owned()),
                );
                if !o.finished {
                    names.push("(the guest stopped before the end)".into());
                }
                println!(
                    "{head}: FAIL after {} s ({} passed{skipped}): {}",
                    took.as_secs(),
                    o.passed,
                    names.join(", ")
                );
                print!("{}", report::describe_all(&o.failed));
                for b in o.broken.iter().filter(|b| b.contains('\n')) {
                    println!("    {b}");
                }
                println!("    logs: {}", log_dir(k).display());
                failed.push(k.series.name);
            }
            Err(e) => {
                println!("{head}: FAIL: {e:#}");
                println!("    logs: {}", log_dir(k).display());
                failed.push(k.series.name);
            }
        }
    }
    println!("vm-test: {} s in all", started.elapsed().as_secs());
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// What a kernel's result line says about skipped tests (`; N skipped
/// (why)`, one clause per reason), and the lines naming them.
fn skips(o: &report::Outcome) -> (String, String) {
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for s in &o.skipped {
        match reasons.iter_mut().find(|(why, _)| *why == s.why) {
            Some((_, names)) => names.push(&s.name),
            None => reasons.push((&s.why, vec![&s.name])),
        }
    }
    let mut head = String::new();
    let mut lines = String::new();
    for (why, names) in reasons {
        head.push_str(&format!("; {} skipped ({why})", names.len()));
        lines.push_str(&format!("    skipped: {}\n", names.join(", ")));
    }
    (head, lines)
}

/// The suites as `cargo test` builds them (the same command and
/// environment, so after `cargo xtask test`'s own test run nothing is
/// built again), stripped of debug information into `dir/suites` to keep
/// the guest's memory for the tests; returns (name, binary). They are
/// dynamically linked: the initramfs carries their libraries.
fn build_suites(dir: &Path, object: &Path) -> Result<Vec<(String, PathBuf)>> {
    println!("vm-test: the test build of {}, stripped", SUITES.join(", "));
    let mut c = crate::cargo("stable");
    c.args(["test", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"]);
    for s in SUITES {
        c.args(["--test", s]);
    }
    c.env("NETPOL_EBPF_OBJECT", object)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = c.output().context("starting cargo")?;
    ensure!(out.status.success(), "building the test binaries failed");
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
            && SUITES.contains(&name)
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    let stripped = dir.join("suites");
    std::fs::create_dir_all(&stripped)
        .with_context(|| format!("creating {}", stripped.display()))?;
    let mut ordered = Vec::new();
    for s in SUITES {
        let (_, exe) = found
            .iter()
            .find(|(n, _)| n == s)
            .with_context(|| format!("cargo built no test binary {s}"))?;
        let dest = stripped.join(s);
        crate::run(
            Command::new("strip")
                .args(["--strip-debug", "-o"])
                .arg(&dest)
                .arg(exe),
        )?;
        ordered.push(((*s).to_owned(), dest));
    }
    Ok(ordered)
}

/// The host's busybox, which must be the static one (busybox-static).
fn static_busybox() -> Result<PathBuf> {
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no busybox: install busybox-static")?;
    if let Some(interp) = elf_interpreter(&path)? {
        bail!(
            "{} is dynamically linked ({interp}); the guest needs busybox-static",
            path.display()
        );
    }
    Ok(path)
}

/// The `PT_INTERP` of an ELF64 executable: `None` for a static one.
fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        b.starts_with(b"\x7fELF") && b.get(4) == Some(&2),
        "{} is not an ELF64 file",
        path.display()
    );
    let u = |at: usize, n: usize| -> Result<u64> {
        let s = b.get(at..at + n).context("ELF header cut short")?;
        Ok(s.iter()
            .rev()
            .fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    };
    let phoff = usize::try_from(u(0x20, 8)?)?;
    let phentsize = usize::try_from(u(0x36, 2)?)?;
    let phnum = usize::try_from(u(0x38, 2)?)?;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u(ph, 4)? == 3 {
            let off = usize::try_from(u(ph + 8, 8)?)?;
            let len = usize::try_from(u(ph + 32, 8)?)?;
            let s = b.get(off..off + len).context("PT_INTERP out of bounds")?;
            return Ok(Some(
                String::from_utf8_lossy(s).trim_end_matches('\0').to_owned(),
            ));
        }
    }
    Ok(None)
}

fn log_dir(k: &Kernel) -> PathBuf {
    vm_dir().join("logs").join(k.series.name)
}

/// Boots `k` with the initramfs and reads what its `/init` reported.
fn boot(k: &Kernel, cpio: &Path, suites: &[&str]) -> Result<(report::Outcome, Duration)> {
    let logs = log_dir(k);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let console = logs.join("console.log");
    let results = logs.join("results.log");
    for f in [&console, &results] {
        let _ = std::fs::remove_file(f);
    }
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
        ])
        .args(["-smp", &GUEST_CPUS.to_string()])
        .args(["-m", "2048", "-nodefaults", "-display", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&k.vmlinux)
        .arg("-initrd")
        .arg(cpio)
        // Kernel messages of warning level and above stay on ttyS0; a
        // panic powers the guest off at once.
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 {}={} {}={GUEST_CPUS}",
            initramfs::SUITES_PARAM,
            suites.join(","),
            initramfs::THREADS_PARAM,
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = started.elapsed();
    let text = std::fs::read_to_string(&results).unwrap_or_default();
    let outcome = report::parse(&text, suites);
    if !outcome.finished {
        let mut why = match status {
            None => format!("timed out after {} s", GUEST_TIMEOUT.as_secs()),
            Some(s) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                format!("qemu exited ({s}) {}", err.trim())
            }
        };
        let con = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = con.lines().rev().take(15).collect();
        why.push_str("; console tail:\n      ");
        why.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n      "));
        let mut o = outcome;
        o.broken.push(format!("guest: {why}"));
        return Ok((o, took));
    }
    Ok((outcome, took))
}
