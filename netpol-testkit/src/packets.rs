//! Running frames through the real programs (BPF_PROG_TEST_RUN) with maps
//! filled by the production map writer from policies compiled by the
//! compiler: the fixture, frame builders and verdict tables shared by the
//! packet test suites.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    panic::{AssertUnwindSafe, catch_unwind, panic_any, resume_unwind},
    sync::{Mutex, OnceLock, PoisonError},
};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{IpNumber, PacketBuilder};
use netpol_agent::{
    Datapath, DatapathConfig, MapSizes,
    compiler::{self, Compiled, IdAllocation},
    model::{self, ObjectRef, Snapshot},
};
use netpol_common::programs;

use crate::{
    datapath::TempBpffs,
    netns::{Netns, privileged, sh},
};

/// The cluster every test starts from: pods x/a and x/b on this node, y/c
/// on another; dual-stack.
pub const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
    - {type: InternalIP, address: 172.16.0.1}
    - {type: InternalIP, address: "fd00:ffff::1"}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {kubernetes.io/metadata.name: y, team: ops}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec:
  nodeName: n1
  containers:
    - name: c
      ports: [{name: http, containerPort: 8080, protocol: TCP}]
status:
  phase: Running
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec:
  nodeName: n1
  containers: [{name: c}]
status:
  phase: Running
  podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {app: c}}
spec:
  nodeName: n2
  containers: [{name: c}]
status:
  phase: Running
  podIPs: [{ip: 10.0.1.3}, {ip: "fd00:1::3"}]
"#;

pub const A4: &str = "10.0.0.1";
pub const A6: &str = "fd00::1";
pub const B4: &str = "10.0.0.2";
pub const B6: &str = "fd00::2";
pub const C4: &str = "10.0.1.3";
pub const C6: &str = "fd00:1::3";
pub const NODE4: &str = "172.16.0.1";

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V {
    Pass,
    Drop,
}

impl fmt::Display for V {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            V::Pass => "pass",
            V::Drop => "drop",
        })
    }
}

/// Where a packet is run: which program, on which pod's interface, and
/// whether it comes from the node itself (`to_pod` only).
#[derive(Clone, Copy)]
pub enum Hook<'a> {
    /// `from_pod` on the pod's interface: the pod sends.
    Egress(&'a str),
    /// `to_pod` on the pod's interface, forwarded from another interface.
    Ingress(&'a str),
    /// `to_pod`, sent by the node's own stack (no ingress interface).
    IngressFromNode(&'a str),
    /// An interface with no endpoint entry.
    Unmanaged,
    /// `leave_node` on the node's uplink (the "other" interface).
    Leave,
}

/// Why a test stops at its first forwarded packet through `to_pod` on a
/// kernel before 5.15: `BPF_PROG_TEST_RUN` takes a non-zero
/// `__sk_buff.ingress_ifindex` from 5.15 on (kernel commit "bpf: Permit
/// ingress_ifindex in bpf_prog_test_run_xattr"; before, `EINVAL`), and
/// with 0 `to_pod` judges the packet as the node's own.
pub const NO_INGRESS_IFINDEX: &str = "a forwarded packet through to_pod needs \
    __sk_buff.ingress_ifindex, which BPF_PROG_TEST_RUN takes from 5.15";

/// What a test skipped on such a kernel writes, straight to its stdout
/// (past libtest's capture): `cargo xtask vm-test` (`vm::report`) reads
/// `@@netpol-vm skip <test>: <why>` lines and counts those tests as
/// skipped, not passed.
const SKIP_MARK: &str = "@@netpol-vm skip";

/// The panic payload that ends a test at its first forwarded `to_pod`
/// packet on a kernel before 5.15; [`with_fixture`] reports it skipped.
struct NeedsIngressIfindex;

/// Whether this kernel's `BPF_PROG_TEST_RUN` takes a non-zero
/// `__sk_buff.ingress_ifindex` (5.15 and later).
fn test_run_takes_ingress_ifindex() -> bool {
    static TAKES: OnceLock<bool> = OnceLock::new();
    *TAKES.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release.trim().split('.').map(|n| n.parse::<u32>().ok());
        match (v.next().flatten(), v.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor) >= (5, 15),
            // Unknown: assume a current kernel (a refused run then fails).
            _ => true,
        }
    })
}

pub struct Fixture {
    pub dp: Datapath,
    pub ifindex: BTreeMap<String, u32>,
    pub compiled: Compiled,
    /// Pods' host interfaces, for the map writer.
    pub ifaces: BTreeMap<ObjectRef, u32>,
}

impl Fixture {
    /// Runs one frame through a hook and returns the verdict.
    pub fn run(&mut self, hook: Hook<'_>, frame: &[u8]) -> V {
        self.run_marked(hook, frame, 0).0
    }

    /// Runs one frame carrying `skb->mark` = `mark` through a hook; returns
    /// the verdict and the mark the program left.
    pub fn run_marked(&mut self, hook: Hook<'_>, frame: &[u8], mark: u32) -> (V, u32) {
        let (prog, iface, iif) = match hook {
            Hook::Egress(p) => (programs::FROM_POD, self.ifindex[p], self.ifindex["fwd"]),
            Hook::Ingress(p) => (programs::TO_POD, self.ifindex[p], self.ifindex["fwd"]),
            Hook::IngressFromNode(p) => (programs::TO_POD, self.ifindex[p], 0),
            Hook::Unmanaged => (programs::TO_POD, self.ifindex["other"], self.ifindex["fwd"]),
            Hook::Leave => (
                programs::LEAVE_NODE,
                self.ifindex["other"],
                self.ifindex["fwd"],
            ),
        };
        let iif = if iif != 0 && !test_run_takes_ingress_ifindex() {
            if prog == programs::TO_POD {
                panic_any(NeedsIngressIfindex);
            }
            // from_pod and leave_node judge egress, where the program never
            // reads it: 0 leaves their verdicts as they are.
            0
        } else {
            iif
        };
        // struct __sk_buff: mark at 8, ingress_ifindex at 36, ifindex at 40;
        // the kernel wants every field it does not accept to be zero.
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        ctx[36..40].copy_from_slice(&iif.to_ne_bytes());
        ctx[40..44].copy_from_slice(&iface.to_ne_bytes());
        let mut ctx_out = [0u8; 192];
        let program = self.dp.program(prog).expect("program");
        let out = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of a {}-byte frame: {e}", frame.len()));
        let mark_out = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
        let v = match out.return_value {
            TC_ACT_OK => V::Pass,
            TC_ACT_SHOT => V::Drop,
            other => panic!("unexpected TC action {other}"),
        };
        (v, mark_out)
    }

    pub fn counter(&self, dir: u32, fam: u32, why: u32) -> u64 {
        self.dp
            .counters()
            .expect("counters")
            .entries
            .iter()
            .find(|e| e.direction == dir && e.family == fam && e.reason == why)
            .map_or(0, |e| e.value.packets)
    }

    /// Compiles `CLUSTER` plus `manifests` against the current ids and
    /// applies the difference, as the agent does on a change.
    pub fn update(&mut self, manifests: &str) {
        let next = compile_with(manifests, &self.compiled.ids);
        let ops: Vec<_> = compiler::diff(&self.compiled, &next).raw().collect();
        self.dp
            .writer()
            .apply(&ops, &self.ifaces)
            .expect("apply update");
        self.compiled = next;
    }

    /// Tracked connections, read back from the pinned map.
    pub fn connections(&self) -> Vec<netpol_common::CtKey> {
        self.tracked().into_iter().map(|(k, _)| k).collect()
    }

    /// Tracked connections and their entries.
    pub fn tracked(&self) -> Vec<(netpol_common::CtKey, netpol_common::CtValue)> {
        let ct: aya::maps::HashMap<_, netpol_common::CtKey, netpol_common::CtValue> =
            self.pinned(netpol_common::maps::CONNTRACK);
        ct.iter().filter_map(Result::ok).collect()
    }

    /// One of the pinned maps, opened apart from the datapath's handles
    /// (what an operator's tool sees).
    pub fn pinned<T: TryFrom<aya::maps::Map>>(&self, name: &str) -> T {
        let pin = self.dp.pin_dir().join(name);
        let data =
            aya::maps::MapData::from_pin(&pin).unwrap_or_else(|e| panic!("pinned {name}: {e}"));
        let map = aya::maps::Map::from_map_data(data).expect("map");
        T::try_from(map).unwrap_or_else(|_| panic!("{name}: another map type"))
    }

    /// Back to a freshly loaded datapath's state holding `CLUSTER` plus
    /// `policies`: every policy entry of the last test removed and the
    /// new ones written through the map writer (ids as a first compile
    /// gives them), connections, fragments, counters and event limits
    /// cleared, the config map's defaults and measured clock restored.
    pub fn reset(&mut self, policies: &str) {
        let empty = Compiled::default();
        let ops: Vec<_> = compiler::diff(&self.compiled, &empty).raw().collect();
        self.dp
            .writer()
            .apply(&ops, &self.ifaces)
            .expect("clear policy");
        self.compiled = empty;
        // Entries a test wrote behind the writer's back.
        clear::<u32, netpol_common::EndpointInfo>(self, netpol_common::maps::ENDPOINTS);
        clear::<netpol_common::CtKey, netpol_common::CtValue>(self, netpol_common::maps::CONNTRACK);
        clear::<netpol_common::FragKey, netpol_common::FragValue>(
            self,
            netpol_common::maps::FRAGMENTS,
        );
        clear::<u32, netpol_common::EventBucket>(self, netpol_common::maps::EVENT_LIMITS);
        zero::<netpol_common::TrafficCounter>(self, netpol_common::maps::COUNTERS);
        zero::<u64>(self, netpol_common::maps::EVENTS_LOST);
        self.dp
            .set_global(DatapathConfig::default().global)
            .expect("config defaults");
        self.dp
            .set_clock(netpol_agent::datapath::clock::jiffy_clock())
            .expect("measured clock");
        let compiled = compile_with(policies, &IdAllocation::default());
        let ops: Vec<_> = compiler::diff(&self.compiled, &compiled).raw().collect();
        let report = self.dp.writer().apply(&ops, &self.ifaces).expect("apply");
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        self.compiled = compiled;
    }

    pub fn endpoint_id(&self, pod: &str) -> u32 {
        let (ns, name) = pod.split_once('/').expect("ns/name");
        self.compiled.endpoints[&ObjectRef::new(ns, name)].id
    }
}

/// A loaded datapath in its netns, kept for the next test of the binary.
struct Shared {
    fx: Fixture,
    ns: Netns,
    bpffs: TempBpffs,
}

/// The datapath every [`with_fixture`] test of this binary runs on, one
/// test at a time. Loading is the verifier's work on every program, most
/// of a packet test's time (seconds each in an emulated guest), and
/// nothing a test leaves behind survives [`Fixture::reset`].
static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// Drops the shared datapath at exit (statics are never dropped): its
/// netns and bpffs mount go with it.
extern "C" fn drop_shared() {
    let shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner).take();
    drop(shared);
}

/// Compiles `CLUSTER` plus `policies`, writes the result through the map
/// writer to a datapath whose runtime state is as a fresh load's, in a
/// private netns with interfaces for the local pods, and hands the
/// fixture to `f`. The datapath is loaded once per test binary and shared
/// by its tests, one at a time.
pub fn with_fixture(policies: &str, f: impl FnOnce(&mut Fixture) + Send) {
    if !privileged() {
        return;
    }
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    let shared = match &mut *shared {
        Some(s) => s,
        empty => {
            // SAFETY: registers a function of no arguments that takes the
            // lock itself; it runs at exit, after every test.
            unsafe { libc::atexit(drop_shared) };
            empty.insert(load_shared())
        }
    };
    let Shared { fx, ns, .. } = shared;
    fx.reset(policies);
    in_netns(ns, fx, f);
}

/// [`with_fixture`] on a datapath of its own, loaded for this test alone
/// (for tests that take the event ring, which a datapath hands out once).
pub fn with_own_fixture(policies: &str, f: impl FnOnce(&mut Fixture) + Send) {
    if !privileged() {
        return;
    }
    let Shared { mut fx, ns, bpffs } = load_shared();
    fx.reset(policies);
    in_netns(&ns, &mut fx, f);
    drop((fx, bpffs));
}

/// Runs `f` in `ns`, reporting a test that needs `ingress_ifindex` on a
/// kernel without it as skipped.
fn in_netns(ns: &Netns, fx: &mut Fixture, f: impl FnOnce(&mut Fixture) + Send) {
    // libtest names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned();
    ns.run(|| match catch_unwind(AssertUnwindSafe(|| f(fx))) {
        Ok(()) => {}
        Err(p) if p.is::<NeedsIngressIfindex>() => {
            let line = format!("{SKIP_MARK} {test}: {NO_INGRESS_IFINDEX}\n");
            // One write(2), apart from libtest's buffered lines.
            let _ = nix::unistd::write(std::io::stdout(), line.as_bytes());
        }
        Err(p) => resume_unwind(p),
    });
}

/// A datapath loaded in a new netns with interfaces for the local pods,
/// holding no policy.
fn load_shared() -> Shared {
    let ns = Netns::new("npk");
    let bpffs = TempBpffs::new();
    let names = ["x/a", "x/b", "fwd", "other"];
    let mut ifindex = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        let dev = format!("d{i}");
        // This kernel has no dummy driver; a veth pair serves as well.
        let peer = format!("{dev}p");
        // x/b's index is past the programs' endpoint cache, so every test
        // runs both lookups: cached (x/a) and straight from the table.
        let index = (netpol_common::ENDPOINT_CACHE_SLOTS + 1000).to_string();
        let mut add = vec!["-n", &ns.name, "link", "add", &dev];
        if *n == "x/b" {
            add.extend(["index", &index]);
        }
        add.extend(["type", "veth", "peer", "name", &peer]);
        sh("ip", &add);
        sh("ip", &["-n", &ns.name, "link", "set", &dev, "up"]);
        let out = sh("ip", &["-n", &ns.name, "-o", "link", "show", "dev", &dev]);
        let idx: u32 = out
            .split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .expect("ifindex");
        ifindex.insert((*n).to_owned(), idx);
    }
    assert!(ifindex["x/a"] < netpol_common::ENDPOINT_CACHE_SLOTS);
    assert!(ifindex["x/b"] >= netpol_common::ENDPOINT_CACHE_SLOTS);
    let ifaces: BTreeMap<ObjectRef, u32> = ["x/a", "x/b"]
        .iter()
        .map(|p| {
            let (n, name) = p.split_once('/').expect("ns/name");
            (ObjectRef::new(n, name), ifindex[*p])
        })
        .collect();
    let dp = ns.run(|| {
        Datapath::load(&DatapathConfig {
            bpffs: bpffs.path().to_owned(),
            map_sizes: MapSizes {
                endpoints: 64,
                policy_v4: 1024,
                policy_v6: 1024,
                ports: 1024,
                conntrack: 1024,
                fragments: 64,
            },
            ..DatapathConfig::default()
        })
        .expect("load")
    });
    Shared {
        fx: Fixture {
            dp,
            ifindex,
            compiled: Compiled::default(),
            ifaces,
        },
        ns,
        bpffs,
    }
}

/// Removes every entry of a pinned hash map.
fn clear<K: aya::Pod, V: aya::Pod>(fx: &Fixture, name: &str) {
    let mut map: aya::maps::HashMap<_, K, V> = fx.pinned(name);
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// Zeroes every slot of a pinned per-CPU array on every CPU.
fn zero<V: aya::Pod + Default>(fx: &Fixture, name: &str) {
    let mut map: aya::maps::PerCpuArray<_, V> = fx.pinned(name);
    let cpus = aya::util::nr_cpus().expect("possible CPUs");
    for i in 0..map.len() {
        let values =
            aya::maps::PerCpuValues::try_from(vec![V::default(); cpus]).expect("one value per CPU");
        map.set(i, values, 0).expect("zero a per-CPU slot");
    }
}

/// `CLUSTER` plus `manifests` (later documents replace earlier objects of
/// the same name), compiled with `ids`.
pub fn compile_with(manifests: &str, ids: &IdAllocation) -> Compiled {
    let mut snap = Snapshot::default();
    let mut report = model::manifests::LoadReport::default();
    model::manifests::apply_str(&mut snap, CLUSTER, "cluster", &mut report);
    model::manifests::apply_str(&mut snap, manifests, "test", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let compiled = compiler::compile(&snap, ids);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    compiled
}

pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

pub fn ips(src: &str, dst: &str) -> (IpAddr, IpAddr) {
    (src.parse().expect("src"), dst.parse().expect("dst"))
}

pub fn builder(src: &str, dst: &str) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    match ips(src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    }
}

pub fn tcp_syn(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .tcp(sport, dport, 1, 1024)
        .syn()
        .write(&mut out, &[])
        .expect("build");
    out
}

pub fn tcp_ack(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .tcp(sport, dport, 1, 1024)
        .ack(1)
        .write(&mut out, b"data")
        .expect("build");
    out
}

pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .udp(sport, dport)
        .write(&mut out, b"q")
        .expect("build");
    out
}

/// An SCTP common header and an INIT chunk (etherparse has no SCTP).
pub fn sctp_init(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&sport.to_be_bytes());
    payload.extend_from_slice(&dport.to_be_bytes());
    payload.extend_from_slice(&[0; 8]); // verification tag, checksum
    payload.extend_from_slice(&[1, 0, 0, 20]); // INIT, flags, length
    payload.extend_from_slice(&[0; 16]);
    let mut out = Vec::new();
    builder(src, dst)
        .write(&mut out, IpNumber(132), &payload)
        .expect("build");
    out
}

pub fn echo_request(src: &str, dst: &str, id: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let b = builder(src, dst);
    match ips(src, dst).0 {
        IpAddr::V4(_) => b.icmpv4_echo_request(id, 1).write(&mut out, b"ping"),
        IpAddr::V6(_) => b.icmpv6_echo_request(id, 1).write(&mut out, b"ping"),
    }
    .expect("build");
    out
}

pub fn icmpv6(src: &str, dst: &str, icmp_type: u8) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: icmp_type,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut out, &[0; 16])
        .expect("build");
    out
}

pub fn arp() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

/// Inserts one 802.1Q tag after the MAC addresses.
pub fn vlan_tagged(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    f.extend_from_slice(&frame[12..]);
    f
}

/// Grows an IPv4 header by one word of options (NOPs and end).
pub fn with_ipv4_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f[14] = 0x46;
    let total = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[34..]);
    f
}

/// Puts an empty hop-by-hop header between the IPv6 header and TCP.
pub fn with_hop_by_hop(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..54].to_vec();
    let next = f[20];
    f[20] = 0;
    let len = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&frame[54..]);
    f
}

/// Marks an IPv4 packet as a non-first fragment.
pub fn later_fragment(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    f
}

pub type Case<'a> = (&'a str, Hook<'a>, Vec<u8>, V);

/// Runs every case in order and asserts the whole table at once.
pub fn assert_table(fx: &mut Fixture, cases: Vec<Case<'_>>) {
    let mut bad = Vec::new();
    for (name, hook, frame, want) in cases {
        let got = fx.run(hook, &frame);
        if got != want {
            bad.push(format!("{name}: expected {want}, got {got}"));
        }
    }
    assert!(bad.is_empty(), "verdicts differ:\n{}", bad.join("\n"));
}

/// A TCP packet with only RST set.
pub fn tcp_rst(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .tcp(sport, dport, 1, 0)
        .rst()
        .write(&mut out, &[])
        .expect("build");
    out
}

const ETH: usize = 14;

/// Splits an IPv4 frame's payload at the given byte counts (multiples of
/// 8 except the last part) into fragments with id `id`; the rest of the
/// payload goes in the last fragment.
pub fn fragments_v4(frame: &[u8], id: u16, sizes: &[usize]) -> Vec<Vec<u8>> {
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let (head, payload) = frame.split_at(ETH + ihl);
    let mut out = Vec::new();
    let mut off = 0;
    let mut cuts: Vec<usize> = sizes.to_vec();
    cuts.push(payload.len() - sizes.iter().sum::<usize>());
    for (i, n) in cuts.iter().enumerate() {
        let mut f = head.to_vec();
        let more = i + 1 < cuts.len();
        let field = ((off / 8) as u16) | if more { 0x2000 } else { 0 };
        f[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
        f[ETH + 6..ETH + 8].copy_from_slice(&field.to_be_bytes());
        let total = (ihl + n) as u16;
        f[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&payload[off..off + n]);
        out.push(f);
        off += n;
    }
    out
}

/// One IPv4 fragment with an arbitrary offset and length of `frame`'s
/// payload (for overlaps).
pub fn fragment_v4_at(frame: &[u8], id: u16, offset: usize, len: usize, more: bool) -> Vec<u8> {
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let (head, payload) = frame.split_at(ETH + ihl);
    let mut f = head.to_vec();
    let field = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
    f[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
    f[ETH + 6..ETH + 8].copy_from_slice(&field.to_be_bytes());
    f[ETH + 2..ETH + 4].copy_from_slice(&((ihl + len) as u16).to_be_bytes());
    f.extend_from_slice(&payload[offset..offset + len]);
    f
}

/// IPv6 fragments: a fragment header (id `id`) after the fixed header,
/// then `extra` (extension headers placed inside the fragmentable part)
/// and the payload, split at the given byte counts.
pub fn fragments_v6(frame: &[u8], id: u32, extra: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let (head, payload) = frame.split_at(ETH + 40);
    let orig_next = head[ETH + 6];
    let mut body = extra.to_vec();
    let first_next = if extra.is_empty() { orig_next } else { 60 };
    if !extra.is_empty() {
        body[0] = orig_next;
    }
    body.extend_from_slice(payload);
    let mut cuts: Vec<usize> = sizes.to_vec();
    cuts.push(body.len() - sizes.iter().sum::<usize>());
    let mut out = Vec::new();
    let mut off = 0;
    for (i, n) in cuts.iter().enumerate() {
        let mut f = head.to_vec();
        f[ETH + 6] = 44;
        f[ETH + 4..ETH + 6].copy_from_slice(&((8 + n) as u16).to_be_bytes());
        let more = u16::from(i + 1 < cuts.len());
        let field = (off as u16) | more;
        f.push(first_next);
        f.push(0);
        f.extend_from_slice(&field.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&body[off..off + n]);
        out.push(f);
        off += n;
    }
    out
}

/// Inserts IPv6 extension headers of the given types (8 bytes each, AH
/// 16) between the fixed header and the transport header.
pub fn with_ext_chain(frame: &[u8], types: &[u8]) -> Vec<u8> {
    let (head, payload) = frame.split_at(ETH + 40);
    let mut f = head.to_vec();
    let orig_next = f[ETH + 6];
    let mut chain = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let next = types.get(i + 1).copied().unwrap_or(orig_next);
        if *t == 51 {
            // AH: length in 4-octet units minus 2 -> 16 bytes.
            chain.extend_from_slice(&[next, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
        } else {
            chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
    }
    f[ETH + 6] = types.first().copied().unwrap_or(orig_next);
    let len = (payload.len() + chain.len()) as u16;
    f[ETH + 4..ETH + 6].copy_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&chain);
    f.extend_from_slice(payload);
    f
}

/// An ESP packet (SPI, sequence, some ciphertext).
pub fn esp(src: &str, dst: &str) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .write(
            &mut out,
            IpNumber(50),
            &[0, 0, 1, 0, 0, 0, 0, 1, 9, 9, 9, 9],
        )
        .expect("build");
    out
}

/// An ICMP error from `router` to `to` quoting the IP packet of `quoted`
/// (a frame): destination unreachable (IPv4, fragmentation needed) or
/// packet too big (IPv6).
pub fn icmp_error(router: &str, to: &str, quoted: &[u8]) -> Vec<u8> {
    let ip = &quoted[ETH..];
    let mut out = Vec::new();
    let b = builder(router, to);
    match ips(router, to).0 {
        IpAddr::V4(_) => b
            .icmpv4(etherparse::Icmpv4Type::Unknown {
                type_u8: 3,
                code_u8: 4,
                bytes5to8: [0, 0, 5, 0xdc],
            })
            .write(&mut out, &ip[..ip.len().min(28)]),
        IpAddr::V6(_) => b
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 2,
                code_u8: 0,
                bytes5to8: [0, 0, 5, 0x00],
            })
            .write(&mut out, &ip[..ip.len().min(48)]),
    }
    .expect("build");
    out
}

/// `frame` with its IP source replaced (checksums are not checked).
pub fn with_source(frame: &[u8], src: &str) -> Vec<u8> {
    let mut f = frame.to_vec();
    match src.parse::<IpAddr>().expect("address") {
        IpAddr::V4(a) => f[ETH + 12..ETH + 16].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => f[ETH + 8..ETH + 24].copy_from_slice(&a.octets()),
    }
    f
}
