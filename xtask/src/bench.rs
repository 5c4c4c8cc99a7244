//! `cargo xtask bench`: builds what a benchmark needs, runs it (criterion),
//! prints one table and records it in docs/PERFORMANCE.md.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result, ensure};

use crate::{BPF_TARGET, bootstrap, cargo, ebpf_cargo, root, run};

const SIZES: [&str; 3] = ["10", "1000", "100000"];
const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

/// Builds the object with the `bench` feature (reference classifiers and
/// the no-tracking switch) apart from the production one.
fn build_bench_object() -> Result<std::path::PathBuf> {
    bootstrap::ebpf_toolchain()?;
    println!("xtask: building the bench eBPF object (feature `bench`)");
    let mut c = ebpf_cargo("build", "target/ebpf-bench");
    c.args(["--features", "bench"]);
    run(&mut c)?;
    let built = root()
        .join("target/ebpf-bench")
        .join(BPF_TARGET)
        .join("release/netpol-ebpf");
    let dest = root().join("target/netpol-ebpf-bench.o");
    std::fs::copy(&built, &dest).with_context(|| format!("copying {}", built.display()))?;
    Ok(dest)
}

/// Median of one criterion benchmark of the datapath group, in ns.
fn median(id: &str) -> Result<f64> {
    median_in("datapath", id)
}

/// Median of one criterion benchmark, in ns.
fn median_in(group: &str, id: &str) -> Result<f64> {
    let path = root()
        .join("target/criterion")
        .join(group)
        .join(id.replace('/', "_"))
        .join("new/estimates.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["median"]["point_estimate"]
        .as_f64()
        .with_context(|| format!("no median in {}", path.display()))
}

pub fn datapath() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the datapath bench loads BPF programs: run it as root"
    );
    bootstrap::debian_tools()?;
    let object = build_bench_object()?;
    println!("xtask: cargo bench -p netpol-agent --bench datapath");
    run(cargo("stable")
        .args(["bench", "-p", "netpol-agent", "--bench", "datapath"])
        .env("NETPOL_EBPF_BENCH_OBJECT", &object))?;

    let mut table = String::new();
    writeln!(
        table,
        "| family | LPM entries | established | new flow, denied | new flow, allowed |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: | ---: |")?;
    let mut ratios = String::new();
    for fam in FAMILIES {
        for n in SIZES {
            writeln!(
                table,
                "| {fam} | {n} | {:.0} ns | {:.0} ns | {:.0} ns |",
                median(&format!("established/{fam}/{n}"))?,
                median(&format!("new_denied/{fam}/{n}"))?,
                median(&format!("new_allowed/{fam}/{n}"))?
            )?;
        }
        let ok = median(&format!("bench_ok/{fam}"))?;
        let lookup = median(&format!("bench_lookup/{fam}"))?;
        let est10 = median(&format!("established/{fam}/10"))?;
        let est100k = median(&format!("established/{fam}/100000"))?;
        let new10 = median(&format!("new_allowed/{fam}/10"))?;
        let new100k = median(&format!("new_allowed/{fam}/100000"))?;
        let verdict = |r: f64, goal: f64| if r <= goal { "met" } else { "MISSED" };
        let (r1, r2, r3) = (est10 / lookup, est100k / est10, new100k / new10);
        writeln!(
            ratios,
            "| {fam} | {ok:.0} ns | {lookup:.0} ns | {r1:.2}× (goal ≤ 2, {}) | {r2:.2}× (goal ≤ 1.10, {}) | {r3:.2}× (goal ≤ 2, {}) |",
            verdict(r1, 2.0),
            verdict(r2, 1.10),
            verdict(r3, 2.0)
        )?;
    }
    let insns = std::fs::read_to_string(root().join("target/netpol-bench/verified_insns.json"))
        .context("reading verified_insns.json")?;
    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout)
        .trim()
        .to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let date = String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%F").output()?.stdout)
        .trim()
        .to_owned();
    let mut section = String::new();
    writeln!(section, "## Datapath (per packet, BPF_PROG_TEST_RUN)\n")?;
    writeln!(
        section,
        "`cargo xtask bench datapath`, {date}, kernel {kernel}, {cpu}, {} CPUs. Medians of \
         criterion samples; each sample is the kernel's own timing of `repeat` runs of \
         `to_pod` on one TCP packet. Absolute times drift on shared machines: read the ratios, \
         which come from the same run.\n",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    )?;
    section.push_str(&table);
    writeln!(
        section,
        "\n| family | reference: return at once | reference: parse + one hash lookup | established ÷ one-lookup | established 100,000 ÷ 10 | new allowed 100,000 ÷ 10 |"
    )?;
    writeln!(section, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    section.push_str(&ratios);
    writeln!(
        section,
        "\nVerified instructions (`verified_insns`, goal ≤ 250,000 per program, a quarter of \
         the kernel's 1,000,000, and independent of the number of rules; `to_pod` verifies a \
         Service packet's source egress steps before the pod's ingress steps): `{}`.",
        insns.trim()
    )?;
    println!("\n{section}");
    write_section(&root().join("docs/PERFORMANCE.md"), "datapath", &section)
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// (appending the block when missing), leaving other sections alone.
fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# netpol performance\n".to_owned());
    let block = format!("{begin}\n{body}{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{block}{}", &old[..b], &old[e + end.len()..])
        }
        _ => format!("{}\n{block}\n", old.trim_end()),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))?;
    println!("xtask: recorded in {}", path.display());
    Ok(())
}

pub fn agent() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the agent bench runs the agent on veths in network namespaces: run it as root"
    );
    bootstrap::debian_tools()?;
    let object = crate::build_ebpf()?;
    println!("xtask: cargo bench -p netpol-agent --bench agent");
    run(cargo("stable")
        .args(["bench", "-p", "netpol-agent", "--bench", "agent"])
        .env("NETPOL_EBPF_OBJECT", &object))?;
    let ms = median_in("agent", "new_pod_enforced")? / 1e6;
    let verdict = if ms <= 50.0 { "met" } else { "MISSED" };
    let section = format!(
        "## Agent: a new pod enforced\n\n`cargo xtask bench agent` (as root): from writing a new \
         pod's manifest (its veth already on the bridge, fail-closed) until `/status` reports its \
         interface bound and programmed, the 10 ms debounce included. Median {ms:.1} ms (goal \
         ≤ 50 ms, {verdict}).\n"
    );
    println!("\n{section}");
    write_section(&root().join("docs/PERFORMANCE.md"), "agent", &section)
}

pub fn kube() -> Result<()> {
    println!("xtask: cargo bench -p netpol-agent --bench kube_source");
    run(cargo("stable").args(["bench", "-p", "netpol-agent", "--bench", "kube_source"]))
}

pub fn compiler() -> Result<()> {
    println!("xtask: cargo bench -p netpol-agent --bench compiler");
    run(cargo("stable").args(["bench", "-p", "netpol-agent", "--bench", "compiler"]))
}
