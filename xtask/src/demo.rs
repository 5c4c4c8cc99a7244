//! `cargo xtask demo`: netpol on a live pod, end to end.
//!
//! Builds the object and the agent, makes a node netns and a pod netns
//! joined by a veth (IPv4 and IPv6), runs the real `netpol-agent attach`
//! inside the node netns with a private bpffs, sends traffic over both
//! families, prints the counters (`netpol-agent stats`) and what bpftool
//! sees, then compiles the built-in example manifests offline.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{bootstrap, build_ebpf, cargo, root, run};

const NODE_NS: &str = "netpol-demo-node";
const POD_NS: &str = "netpol-demo-pod";
const HOST_IF: &str = "npdemo0";

/// Removes everything the demo made, also when it fails half way.
struct Cleanup {
    agent: Option<Child>,
    bpffs: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            // SIGTERM lets the agent detach cleanly; kill if it lingers.
            let _ = Command::new("kill").arg(a.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if a.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        for ns in [NODE_NS, POD_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("umount")
            .arg(&self.bpffs)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn in_node(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NODE_NS, program]).args(args);
    c
}

pub fn demo() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the demo creates network namespaces and loads BPF programs: run it as root"
    );
    bootstrap::all()?;
    build_ebpf()?;
    println!("demo: building netpol-agent");
    run(cargo("stable").args(["build", "-p", "netpol-agent"]))?;
    let agent = root().join("target/debug/netpol-agent");

    let bpffs = std::env::temp_dir().join("netpol-demo-bpffs");
    let mut cleanup = Cleanup {
        agent: None,
        bpffs: bpffs.clone(),
    };
    // A previous run that was killed may have left these behind.
    drop(Cleanup {
        agent: None,
        bpffs: bpffs.clone(),
    });

    println!("demo: node netns {NODE_NS}, pod netns {POD_NS}, veth {HOST_IF} <-> eth0");
    for ns in [NODE_NS, POD_NS] {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&[
        "-n", NODE_NS, "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns",
        POD_NS,
    ])?;
    for (ns, dev, v4, v6) in [
        (NODE_NS, HOST_IF, "192.0.2.1/24", "2001:db8::1/64"),
        (POD_NS, "eth0", "192.0.2.2/24", "2001:db8::2/64"),
    ] {
        ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
        ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }

    println!("demo: netpol-agent attach --interface {HOST_IF} (in the node netns)");
    std::fs::create_dir_all(&bpffs)?;
    // Mounted here rather than by the agent: `ip netns exec` runs it in a
    // mount namespace of its own, whose new mounts this process cannot see,
    // while a mount made before is shared with it.
    run(Command::new("mount")
        .args(["-t", "bpf", "bpffs"])
        .arg(&bpffs))?;
    let child = in_node(agent.to_str().context("agent path")?, &[])
        .arg("--bpffs")
        .arg(&bpffs)
        .args(["attach", "--interface", HOST_IF])
        .env("NETPOL_EBPF_OBJECT", crate::object_path())
        .spawn()
        .context("starting netpol-agent")?;
    cleanup.agent = Some(child);
    wait_for_pin(&bpffs.join("netpol/NETPOL_COUNTERS"), &mut cleanup)?;

    for addr in ["192.0.2.2", "2001:db8::2"] {
        println!("demo: ping {addr} from the node");
        run(&mut in_node(
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "2", addr],
        ))?;
    }

    println!("demo: bpftool prog show (netpol's programs)");
    let progs = Command::new("bpftool").args(["prog", "show"]).output()?;
    for line in String::from_utf8_lossy(&progs.stdout).lines() {
        if line.contains("from_pod") || line.contains("to_pod") {
            println!("  {line}");
        }
    }
    println!("demo: netpol-agent stats");
    run(in_node(agent.to_str().context("agent path")?, &[])
        .arg("--bpffs")
        .arg(&bpffs)
        .arg("stats"))?;

    compile_examples(&agent)?;
    drop(cleanup);
    println!("demo: done (namespaces and bpffs removed)");
    Ok(())
}

fn wait_for_pin(pin: &Path, cleanup: &mut Cleanup) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if pin.exists() {
            // The pin appears at load; give the attach a moment to finish.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(());
        }
        if let Some(a) = cleanup.agent.as_mut()
            && let Some(status) = a.try_wait()?
        {
            anyhow::bail!("netpol-agent exited early ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!(
        "netpol-agent did not pin its maps at {} in time",
        pin.display()
    )
}

/// The offline compile of the example manifests, when the agent has it.
fn compile_examples(agent: &Path) -> Result<()> {
    let examples = root().join("deploy/examples");
    if !examples.is_dir() {
        return Ok(());
    }
    println!(
        "demo: netpol-agent compile --manifests {} -o table",
        examples.display()
    );
    run(Command::new(agent)
        .args(["compile", "--manifests"])
        .arg(&examples)
        .args(["-o", "table"]))
}
