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
    let (kernel, cpu) = kernel_and_cpu()?;
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

/// Records section `name` of docs/PERFORMANCE.md.
pub(crate) fn record(name: &str, body: &str) -> Result<()> {
    write_section(&root().join("docs/PERFORMANCE.md"), name, body)
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
    // The binary the image ships (static, musl): what a cluster runs.
    crate::bootstrap::image_tools()?;
    let agent = crate::image::static_agent()?;
    println!(
        "xtask: cargo bench -p netpol-agent --bench agent_api (agent: {})",
        agent.display()
    );
    run(cargo("stable")
        .args(["bench", "-p", "netpol-agent", "--bench", "agent_api"])
        .env("NETPOL_EBPF_OBJECT", &object)
        .env("NETPOL_AGENT_BIN", &agent)
        // The figures written are the default attach path's.
        .env_remove("NETPOL_BENCH_ATTACH_MODE"))?;
    let path = root().join("target/netpol-bench/agent_api.json");
    let api: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let (date, machine) = machine()?;
    let mut section = String::new();
    writeln!(
        section,
        "## Agent: from the API to the packet
"
    )?;
    writeln!(
        section,
        "`cargo xtask bench agent` (as root), {date}, {machine}. The image's static (musl) `netpol-agent run` binary \
         in a node namespace, its pods real veths, its source the fake API server over TCP \
         (in the bench's process). What each figure covers and leaves out is in \
         `netpol-agent/benches/agent_api.rs`.\n"
    )?;
    let c = &api["cluster"];
    writeln!(
        section,
        "**One change**, cluster of {} pods ({} on this node), {} policies, {} namespaces: \
         from the API write to the first UDP datagram judged under the new verdict (a grant: \
         the first one through; a revocation of the established flow: the last one through). \
         Datagrams every ~100 µs, so ±0.1 ms. Goal p50 ≤ 2 ms, p99 ≤ 5 ms.\n",
        c["pods"], c["local_pods"], c["policies"], c["namespaces"]
    )?;
    writeln!(
        section,
        "| change | grant p50 | grant p99 | revoke p50 | revoke p99 | goal |"
    )?;
    writeln!(section, "| --- | ---: | ---: | ---: | ---: | --- |")?;
    for row in api["changes"].as_array().into_iter().flatten() {
        let (g50, g99, r50, r99) = (
            f(&row["grant_p50_ms"]),
            f(&row["grant_p99_ms"]),
            f(&row["revoke_p50_ms"]),
            f(&row["revoke_p99_ms"]),
        );
        writeln!(
            section,
            "| {} | {g50:.2} ms | {g99:.2} ms | {r50:.2} ms | {r99:.2} ms | {} |",
            row["change"].as_str().unwrap_or_default(),
            met(g50.max(r50) <= 2.0 && g99.max(r99) <= 5.0)
        )?;
    }
    let cold = &api["cold_start"];
    writeln!(
        section,
        "\n**Cold start**, 110 local pods (real veths), a fresh agent and bpffs. Goals: every \
         local pod enforced ≤ 2 s after the Pod list starts, resident growth ≤ 4 KiB per \
         remote pod, idle CPU 0 (read: under 0.5% of a core, over 10 s, 5 s after every \
         interface is on TCX links). With the default `--attach-mode=auto` the pods are \
         enforced by netlink filters first and move to TCX links after.\n"
    )?;
    writeln!(
        section,
        "| pods / policies / namespaces | enforced after the Pod list | after the start | every interface on TCX links, after the Pod list | resident | idle CPU |"
    )?;
    writeln!(section, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for k in ["small", "large"] {
        let r = &cold[k];
        writeln!(
            section,
            "| {} / {} / {} | {:.2} s ({}) | {:.2} s | {:.2} s | {:.0} MiB | {:.2}% ({}) |",
            r["pods"],
            r["policies"],
            r["namespaces"],
            f(&r["enforced_after_list_s"]),
            met(f(&r["enforced_after_list_s"]) <= 2.0),
            f(&r["enforced_after_start_s"]),
            f(&r["on_tcx_after_list_s"]),
            f(&r["resident_bytes"]) / 1_048_576.0,
            f(&r["idle_cpu"]) * 100.0,
            met(f(&r["idle_cpu"]) < 0.005),
        )?;
    }
    let per = f(&cold["per_remote_pod_bytes"]) / 1024.0;
    writeln!(
        section,
        "\nResident growth per remote pod: {per:.2} KiB ({}).\n",
        met(per <= 4.0)
    )?;
    writeln!(
        section,
        "**A new pod on the files source** (`--bench agent`): from writing its manifest (its \
         veth already attached, fail-closed) until `/status` reports its interface bound and \
         programmed. Median {ms:.1} ms (goal ≤ 50 ms, {}).",
        met(ms <= 50.0)
    )?;
    println!("\n{section}");
    write_section(&root().join("docs/PERFORMANCE.md"), "agent", &section)
}

/// What netpol-cni adds to a pod's start (`--bench agent_api --
/// pod-start`), with the image's static agent and plugin.
pub fn pod_start() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the pod-start bench runs the agent and the CNI chain in network namespaces: run it as root"
    );
    bootstrap::debian_tools()?;
    let object = crate::build_ebpf()?;
    crate::bootstrap::image_tools()?;
    let agent = crate::image::static_agent()?;
    let plugin = agent.with_file_name("netpol-cni");
    println!("xtask: cargo bench -p netpol-agent --bench agent_api -- pod-start");
    run(cargo("stable")
        .args([
            "bench",
            "-p",
            "netpol-agent",
            "--bench",
            "agent_api",
            "--",
            "pod-start",
        ])
        .env("NETPOL_EBPF_OBJECT", &object)
        .env("NETPOL_AGENT_BIN", &agent)
        .env("NETPOL_CNI_BIN", &plugin))?;
    let path = root().join("target/netpol-bench/pod_start.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let r = &v["pod_start"];
    let (date, machine) = machine()?;
    let base = &r["baseline"];
    let mut section = String::new();
    writeln!(section, "## Pod start: what netpol-cni adds\n")?;
    writeln!(
        section,
        "`cargo xtask bench pod-start` (as root), {date}, {machine}. The image's static \
         `netpol-agent run` and `netpol-cni`, the agent on the fake API server's cluster of {} \
         pods; {} pods started one after another through Debian's `bridge` (host-local, \
         dual-stack), `portmap` and `netpol-cni`, each plugin a process run as the runtime runs \
         it, the next 0–300 ms after, all deleted at the end. `auto` is the agent's default: \
         netlink filters at once, TCX links once no pod has started for 200 ms, so some pods \
         start while another's interface moves. The same chain without an agent and without `netpol-cni` \
         runs first, in the same run, as the baseline. What it covers and leaves out is in \
         `netpol-agent/benches/agent_api.rs` (`pod_start`).\n",
        r["cluster_pods"], r["pods"]
    )?;
    writeln!(
        section,
        "| attach | `netpol-cni` step p50 / p99 (goal p99 ≤ 10 ms) | of which the agent p50 / p99 \
         | `bridge` step p50 / p99 | whole chain p50 / p99 | added to the chain (p50) | not \
         programmed at ADD (goal 0) |"
    )?;
    writeln!(section, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    writeln!(
        section,
        "| no agent (baseline) | | | {:.2} / {:.2} ms | {:.2} / {:.2} ms | | |",
        f(&base["bridge_p50_ms"]),
        f(&base["bridge_p99_ms"]),
        f(&base["chain_p50_ms"]),
        f(&base["chain_p99_ms"])
    )?;
    for m in r["modes"].as_array().into_iter().flatten() {
        let n99 = f(&m["netpol_cni_p99_ms"]);
        let late = m["not_programmed_at_add"].as_u64().unwrap_or(u64::MAX);
        writeln!(
            section,
            "| {} | {:.2} / {n99:.2} ms ({}) | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / \
             {:.2} ms | {:+.2} ms | {late} of {} ({}) |",
            m["mode"].as_str().unwrap_or("?"),
            f(&m["netpol_cni_p50_ms"]),
            met(n99 <= 10.0),
            f(&m["agent_p50_ms"]),
            f(&m["agent_p99_ms"]),
            f(&m["bridge_p50_ms"]),
            f(&m["bridge_p99_ms"]),
            f(&m["chain_p50_ms"]),
            f(&m["chain_p99_ms"]),
            f(&m["chain_p50_ms"]) - f(&base["chain_p50_ms"]),
            r["pods"],
            met(late == 0)
        )?;
    }
    writeln!(
        section,
        "\n\"Not programmed at ADD\": pods whose veth was not bound and programmed when their \
         ADD returned (goal 0: from ADD returning, the pod's first packet meets its full policy). \
         \"Added to the chain\" is the median of the whole chain with the agent less the \
         baseline's: it includes the agent's attach to the new veth, which runs while `bridge` \
         does and takes `rtnl_lock` as `bridge` does."
    )?;
    println!("\n{section}");
    write_section(&root().join("docs/PERFORMANCE.md"), "pod-start", &section)
}

pub fn kube() -> Result<()> {
    println!("xtask: cargo bench -p netpol-agent --bench kube_source");
    run(cargo("stable").args(["bench", "-p", "netpol-agent", "--bench", "kube_source"]))
}

pub fn compiler() -> Result<()> {
    println!("xtask: cargo bench -p netpol-agent --bench compiler");
    run(cargo("stable").args(["bench", "-p", "netpol-agent", "--bench", "compiler"]))
}

/// The running kernel's release and the CPU's model name.
fn kernel_and_cpu() -> Result<(String, String)> {
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
    Ok((kernel, cpu))
}

/// Kernel, CPU, CPU count and date, for the recorded sections.
pub(crate) fn machine() -> Result<(String, String)> {
    let (kernel, cpu) = kernel_and_cpu()?;
    let date = String::from_utf8_lossy(
        &Command::new("date")
            .arg("-u")
            .arg("+%F %H:%M UTC")
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    Ok((
        date,
        format!("kernel {kernel}, {cpu}, {cpus} CPUs (shared with other work)"),
    ))
}

/// Runs one of the privileged comparison benches and reads its JSON.
fn run_comparison(bench: &str) -> Result<serde_json::Value> {
    ensure!(
        crate::netpol_is_root(),
        "the {bench} bench loads BPF programs and runs iptables in private network namespaces: \
         run it as root"
    );
    bootstrap::debian_tools()?;
    let object = crate::build_ebpf()?;
    println!("xtask: cargo bench -p netpol-agent --bench {bench}");
    run(cargo("stable")
        .args(["bench", "-p", "netpol-agent", "--bench", bench])
        .env("NETPOL_EBPF_OBJECT", &object))?;
    let path = root().join(format!("target/netpol-bench/{bench}.json"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

pub fn control() -> Result<()> {
    let j = run_comparison("control")?;
    let (date, machine) = machine()?;
    let (n, b) = (&j["netpol"], &j["baseline"]);
    let mut s = String::new();
    writeln!(
        s,
        "## Control plane: netpol against kube-router's iptables + ipset\n"
    )?;
    writeln!(
        s,
        "`cargo xtask bench control` (as root), {date}, {machine}. The compiler bench's seeded \
         cluster ({} pods, {} on this node, {} policies, {} namespaces), from a changed \
         snapshot to enforced state. netpol: compile + diff + writes into real BPF maps ({} \
         map operations; {} IPv4 + {} IPv6 policy entries). Baseline \
         (`netpol_testkit::baseline`, kube-router's shapes): render the texts, then one \
         kube-router sync — `iptables-save`, `ipset restore` per family (fill a temporary set, \
         swap), `iptables-restore` + `ip6tables-restore` of the filter table — in the bench's \
         own network namespace; IPv4 {} sets / {} entries / {} chains / {} rules, IPv6 {} / {} \
         / {} / {}. Contenders interleaved in every round; p50 / p99 in ms.\n",
        j["cluster"]["pods"],
        j["cluster"]["local_pods"],
        j["cluster"]["policies"],
        j["cluster"]["namespaces"],
        n["full_ops"],
        n["policy_v4"],
        n["policy_v6"],
        b["ipv4"]["sets"],
        b["ipv4"]["set_entries"],
        b["ipv4"]["chains"],
        b["ipv4"]["rules"],
        b["ipv6"]["sets"],
        b["ipv6"]["set_entries"],
        b["ipv6"]["chains"],
        b["ipv6"]["rules"],
    )?;
    writeln!(
        s,
        "| | netpol | baseline, iptables-legacy | baseline, iptables-nft |"
    )?;
    writeln!(s, "| --- | ---: | ---: | ---: |")?;
    let pair = |v: &serde_json::Value| format!("{:.1} / {:.1}", f(&v["p50"]), f(&v["p99"]));
    writeln!(
        s,
        "| full apply (baseline: render + sync) | {} | {} | {} |",
        pair(&n["full"]),
        pair(&b["legacy"]["full"]),
        pair(&b["nft"]["full"])
    )?;
    writeln!(
        s,
        "| — baseline render (pure, this crate's generator) | | {} | {} |",
        pair(&b["legacy"]["render"]),
        pair(&b["nft"]["render"])
    )?;
    writeln!(
        s,
        "| — baseline restore (save + ipset + iptables) | | {} | {} |",
        pair(&b["legacy"]["restore"]),
        pair(&b["nft"]["restore"])
    )?;
    let nf = f(&n["full"]["p50"]);
    let (rl, rn) = (
        f(&b["legacy"]["restore"]["p50"]) / nf,
        f(&b["nft"]["restore"]["p50"]) / nf,
    );
    writeln!(
        s,
        "| — baseline restore ÷ netpol full apply (p50; goal ≥ 10×) | | {rl:.0}× ({}) | {rn:.0}× ({}) |",
        met(rl >= 10.0),
        met(rn >= 10.0)
    )?;
    for (what, key) in [
        ("save", "save"),
        ("ipset restore", "ipset"),
        ("iptables-restore", "iptables"),
    ] {
        writeln!(
            s,
            "| — of which {what} (p50) | | {:.1} | {:.1} |",
            f(&b["legacy"]["steps"][key]),
            f(&b["nft"]["steps"][key])
        )?;
    }
    let (l50, l99) = (f(&n["label"]["p50"]), f(&n["label"]["p99"]));
    writeln!(
        s,
        "| one pod's labels (netpol: update + {} map operations, alone; baseline: full sync \
         over the previous one) | **{l50:.2} / {l99:.2}** | {} | {} |",
        n["label_ops"],
        pair(&b["legacy"]["label"]),
        pair(&b["nft"]["label"])
    )?;
    writeln!(
        s,
        "| — netpol's thread CPU time of the same updates (work without preemption) | {} | | |",
        pair(&n["label_cpu"])
    )?;
    writeln!(
        s,
        "| — netpol interleaved with the baseline's syncs (each sync's aftermath disturbs \
         the machine) | {} | | |",
        pair(&n["label_interleaved"])
    )?;
    writeln!(
        s,
        "\nGoals: full apply ≥ 10× faster than the baseline's restore: legacy {rl:.0}×, nft \
         {rn:.0}× ({}); one pod's label change p50 ≤ 2 ms ({l50:.2} ms, {}), p99 ≤ 10 ms \
         ({l99:.2} ms, {}). Samples: {} netpol full applies, {} per baseline; {} netpol label \
         changes alone and {} interleaved, {} baseline syncs per backend.",
        met(rl >= 10.0 && rn >= 10.0),
        met(l50 <= 2.0),
        met(l99 <= 10.0),
        n["full"]["n"],
        b["legacy"]["full"]["n"],
        n["label"]["n"],
        n["label_interleaved"]["n"],
        b["legacy"]["label"]["n"],
    )?;
    println!("\n{s}");
    write_section(&root().join("docs/PERFORMANCE.md"), "control", &s)
}

pub fn throughput() -> Result<()> {
    let j = run_comparison("throughput")?;
    let (date, machine) = machine()?;
    let results = j["results"].as_array().context("no results")?;
    let get = |size: u64, fam: &str, test: &str, config: &str| -> Option<serde_json::Value> {
        results
            .iter()
            .find(|r| {
                r["size"] == size
                    && r["family"] == fam
                    && r["test"] == test
                    && r["config"] == config
            })
            .cloned()
    };
    let ratio = |size: u64, fam: &str, test: &str, config: &str| -> f64 {
        get(size, fam, test, config).map_or(f64::NAN, |r| f(&r["ratio"]))
    };
    let mut s = String::new();
    writeln!(
        s,
        "## Throughput: netpol against kube-router's iptables + ipset\n"
    )?;
    writeln!(
        s,
        "`cargo xtask bench throughput` (as root), {date}, {machine}. Each configuration has a \
         lane of its own, all built alike: a node namespace routing between a server pod and a \
         client pod. The server's ingress and the client's egress each carry N entries per \
         family (N/10 policies of ten /32 or /128 ipBlocks, none matching) before the policy \
         allowing the pair. In-process load generators in netperf's shapes (TCP_RR: one byte \
         each way on one connection; TCP_CRR: a connection per transaction; TCP_STREAM: 64 KiB \
         writes), client and servers pinned to one CPU as netperf runs are (left free, the \
         scheduler flips them between one and two CPUs and the rates between two modes). A \
         cycle runs every configuration once for {} ms, in an order rotating between cycles; \
         {} cycles per test, size and round, {} rounds. Figures are medians over all cycles of \
         the ratio to the same cycle's no-filter run, the quartiles in brackets; `none-b` is a \
         second unfiltered lane, the A/A control: its spread is what the bench can resolve on \
         this machine. `netpol-10` is a second netpol lane that keeps 10 entries throughout; \
         `netpol ÷ netpol-10` is the median of their ratio inside each cycle, the measure of \
         what N entries cost against 10. `netpol-cnp` is a third netpol lane with the same \
         policies plus 100 ClusterNetworkPolicies of 25 rules per direction applying to both \
         pods (both tiers, Accept/Deny/Pass, peers networks that are not the pair's: every \
         connection goes through both tiers to NetworkPolicy); `netpol-cnp ÷ netpol` is the \
         median of their ratio inside each cycle. `netpol-staged` is a fourth with the same \
         policies plus two staged NetworkPolicies that change both pods' staged view (each \
         direction also admits a documentation range), so every new connection is judged \
         against the staged entries as well (both views allow the pair: no report); \
         `netpol-staged ÷ netpol` likewise.\n",
        j["ms_per_run"], j["slices"], j["rounds"]
    )?;
    writeln!(
        s,
        "| N | family | test | no filter | none-b (A/A) | netpol | netpol-10 | netpol ÷ \
         netpol-10 | netpol-cnp ÷ netpol | netpol-staged ÷ netpol | iptables-nft | \
         iptables-legacy |"
    )?;
    writeln!(
        s,
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    let cell = |size: u64, fam: &str, test: &str, config: &str| -> String {
        get(size, fam, test, config).map_or_else(
            || "—".to_owned(),
            |r| {
                format!(
                    "{:.3} ({:.2}–{:.2})",
                    f(&r["ratio"]),
                    f(&r["ratio_q1"]),
                    f(&r["ratio_q3"])
                )
            },
        )
    };
    for size in [10u64, 1000, 10000] {
        for fam in ["ipv4", "ipv6"] {
            for test in ["tcp_rr", "tcp_crr", "tcp_stream"] {
                let none = get(size, fam, test, "none").map_or(f64::NAN, |r| f(&r["median"]));
                let abs = if test == "tcp_stream" {
                    format!("{:.2} Gbit/s", none * 8.0 / 1e9)
                } else {
                    format!("{none:.0}/s")
                };
                writeln!(
                    s,
                    "| {size} | {fam} | {} | {abs} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    test.to_uppercase(),
                    cell(size, fam, test, "none-b"),
                    cell(size, fam, test, "netpol"),
                    cell(size, fam, test, "netpol-10"),
                    cell(size, fam, test, "netpol-over-10"),
                    cell(size, fam, test, "netpol-cnp-over-netpol"),
                    cell(size, fam, test, "netpol-staged-over-netpol"),
                    cell(size, fam, test, "iptables-nft"),
                    cell(size, fam, test, "iptables-legacy")
                )?;
            }
        }
    }
    writeln!(
        s,
        "\nWhere netpol's cost comes from: the kernel's own run time of `from_pod` and `to_pod` \
         (`BPF_ENABLE_STATS`, on for one extra netpol run per test, size and round, as it adds \
         two clock reads to every run) against the wall time of that run, all on the one CPU. \
         The program share is the most netpol can take from a configuration's rate; the rest \
         of a ratio's distance from 1 is the attach hooks and noise.\n"
    )?;
    writeln!(
        s,
        "| N | family | test | program time ÷ wall time | per program run | runs per \
         transaction |"
    )?;
    writeln!(s, "| ---: | --- | --- | ---: | ---: | ---: |")?;
    for size in [10u64, 1000, 10000] {
        for fam in ["ipv4", "ipv6"] {
            for test in ["tcp_rr", "tcp_crr", "tcp_stream"] {
                let Some(a) = get(size, fam, test, "netpol-programs") else {
                    continue;
                };
                let (time, runs) = (f(&a["program_secs"]), f(&a["program_runs"]));
                let (count, secs) = (f(&a["count"]), f(&a["secs"]));
                let per = if test == "tcp_stream" {
                    format!("{:.1} per MB", runs / (count / 1e6))
                } else {
                    format!("{:.1}", runs / count)
                };
                writeln!(
                    s,
                    "| {size} | {fam} | {} | {:.1}% | {:.0} ns | {per} |",
                    test.to_uppercase(),
                    100.0 * time / secs,
                    1e9 * time / runs
                )?;
            }
        }
    }
    writeln!(s, "\nGoals at N = 10,000 (per family):\n")?;
    writeln!(s, "| goal | ipv4 | ipv6 |")?;
    writeln!(s, "| --- | --- | --- |")?;
    let row = |s: &mut String, goal: &str, v: &dyn Fn(&str) -> (f64, bool)| -> Result<()> {
        let (a, b) = (v("ipv4"), v("ipv6"));
        writeln!(
            s,
            "| {goal} | {:.3} ({}) | {:.3} ({}) |",
            a.0,
            met(a.1),
            b.0,
            met(b.1)
        )?;
        Ok(())
    };
    row(&mut s, "TCP_RR netpol ÷ no filter ≥ 0.95", &|fam| {
        let r = ratio(10000, fam, "tcp_rr", "netpol");
        (r, r >= 0.95)
    })?;
    row(&mut s, "TCP_STREAM netpol ÷ no filter ≥ 0.95", &|fam| {
        let r = ratio(10000, fam, "tcp_stream", "netpol");
        (r, r >= 0.95)
    })?;
    row(&mut s, "TCP_CRR netpol ÷ no filter ≥ 0.90", &|fam| {
        let r = ratio(10000, fam, "tcp_crr", "netpol");
        (r, r >= 0.90)
    })?;
    for backend in ["iptables-nft", "iptables-legacy"] {
        row(
            &mut s,
            &format!("TCP_CRR netpol ÷ {backend} baseline ≥ 1.3"),
            &|fam| {
                let r =
                    ratio(10000, fam, "tcp_crr", "netpol") / ratio(10000, fam, "tcp_crr", backend);
                (r, r >= 1.3)
            },
        )?;
    }
    for test in ["tcp_rr", "tcp_crr", "tcp_stream"] {
        row(
            &mut s,
            &format!(
                "{} netpol at 10,000 ÷ at 10 (netpol ÷ netpol-10) ≥ 0.97",
                test.to_uppercase()
            ),
            &|fam| {
                let r = ratio(10000, fam, test, "netpol-over-10");
                (r, r >= 0.97)
            },
        )?;
    }
    row(
        &mut s,
        "TCP_CRR with 100 ClusterNetworkPolicies ÷ without (netpol-cnp ÷ netpol) at 10,000 ≥ 0.97",
        &|fam| {
            let r = ratio(10000, fam, "tcp_crr", "netpol-cnp-over-netpol");
            (r, r >= 0.97)
        },
    )?;
    row(
        &mut s,
        "TCP_CRR with staged policies on every endpoint ÷ without (netpol-staged ÷ netpol) at \
         10,000 ≥ 0.98",
        &|fam| {
            let r = ratio(10000, fam, "tcp_crr", "netpol-staged-over-netpol");
            (r, r >= 0.98)
        },
    )?;
    println!("\n{s}");
    write_section(&root().join("docs/PERFORMANCE.md"), "throughput", &s)
}
