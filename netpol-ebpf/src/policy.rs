//! The policy lookup: the peer's longest matching prefix gives a rule set,
//! the rule set's port trie decides the protocol and port.
use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    PORT_KEY_PROTOCOL_BITS, PolicyKeyV4, PolicyKeyV6, PortKey, SELECTOR_BITS, direction,
    endpoint_flags, family, policy_selector, reason, scratch, staged_endpoint,
};

use crate::{
    config, conntrack,
    maps::{NETPOL_POLICY_V4, NETPOL_POLICY_V6, NETPOL_PORTS},
    packet,
};

/// Whether a rule of the endpoint's policies in `dir` allows `peer` on
/// `protocol` and the connection's destination port `dport`.
#[inline(always)]
pub fn allows(
    endpoint: u32,
    dir: u32,
    fam: u32,
    protocol: u8,
    dport: u16,
    peer: &[u8; 16],
) -> bool {
    let selector = policy_selector(endpoint, dir);
    let ruleset = if fam == family::IPV4 {
        let key = Key::new(
            SELECTOR_BITS + 32,
            PolicyKeyV4 {
                selector,
                addr: [peer[0], peer[1], peer[2], peer[3]],
            },
        );
        NETPOL_POLICY_V4.get(&key).map(|v| v.ruleset)
    } else {
        let key = Key::new(
            SELECTOR_BITS + 128,
            PolicyKeyV6 {
                selector,
                addr: *peer,
            },
        );
        NETPOL_POLICY_V6.get(&key).map(|v| v.ruleset)
    };
    let Some(ruleset) = ruleset else {
        return false;
    };
    let key = Key::new(
        PORT_KEY_PROTOCOL_BITS + 16,
        PortKey {
            ruleset,
            protocol,
            _pad: 0,
            port: dport.to_be_bytes(),
        },
    );
    NETPOL_PORTS.get(&key).is_some_and(|v| v.allow != 0)
}

/// Whether an endpoint's policies allow its hairpin through one of its
/// Services (`flags` its `EndpointInfo::flags`, `fam` the family,
/// `packet` [`Packet::event_word`](crate::packet::Packet::event_word)):
/// each isolated direction looked up with the translated destination, the
/// pod's own address, as the peer. Bit 0 of the result: the enforced view
/// allows it. Where the staged view judges the pod's hairpin or one of
/// its directions otherwise and the connection is new, bits 8-15 carry
/// the report ([`reason::STAGED_WOULD_DENY`], `STAGED_WOULD_ALLOW`) and
/// bits 16-23 the direction that denies in the view that denies (for
/// `verdict::report_hairpin`). A *global* function, as
/// `netpol_deny_event` is, so the verifier checks its lookups once on
/// their own rather than on every path of `to_pod` (inlined, they failed
/// kernel 5.10's datapath tests); before 5.12 global functions take the
/// context and scalars only, so it reads the address from the packet
/// again.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn netpol_hairpin_allows(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    endpoint: u32,
    flags_family: u64,
    packet: u64,
) -> i32 {
    let ctx = aya_ebpf::programs::TcContext::new(skb);
    let flags = flags_family as u32;
    let fam = (flags_family >> 32) as u32;
    let l3 = (packet >> 16) as u16 as usize;
    let protocol = packet as u8;
    let dport = (packet >> 48) as u16;
    let mut own = [0u8; 16];
    if fam == family::IPV4 {
        let Ok(a) = ctx.load::<[u8; 4]>(l3 + 16) else {
            return 0;
        };
        own[..4].copy_from_slice(&a);
    } else {
        let Ok(a) = ctx.load::<[u8; 16]>(l3 + 24) else {
            return 0;
        };
        own = a;
    }
    // A direction in one view: the staged view's entries where its flags
    // say it differs, the enforced ones otherwise.
    let allowed = |dir: u32, staged: bool| {
        let (differs, staged_isolated) = endpoint_flags::staged(dir);
        if staged && flags & differs != 0 {
            flags & staged_isolated == 0
                || allows(staged_endpoint(endpoint), dir, fam, protocol, dport, &own)
        } else {
            flags & endpoint_flags::isolated(dir) == 0
                || allows(endpoint, dir, fam, protocol, dport, &own)
        }
    };
    // A view's verdict: 0 allows, else 1 + the direction that denies.
    let denies = |staged: bool| {
        let judged = (flags & endpoint_flags::HAIRPIN_JUDGED != 0)
            != (staged && flags & endpoint_flags::STAGED_HAIRPIN != 0);
        if !judged {
            0
        } else if !allowed(direction::EGRESS, staged) {
            1 + direction::EGRESS
        } else if !allowed(direction::INGRESS, staged) {
            1 + direction::INGRESS
        } else {
            0
        }
    };
    let enforced = denies(false);
    let verdict = i32::from(enforced == 0);
    let staged_flags = endpoint_flags::STAGED_HAIRPIN
        | endpoint_flags::STAGED_INGRESS
        | endpoint_flags::STAGED_EGRESS;
    if flags & staged_flags == 0 {
        return verdict;
    }
    let staged = denies(true);
    let (report, dir) = match (enforced, staged) {
        (0, 0) => return verdict,
        (0, d) => (reason::STAGED_WOULD_DENY, d - 1),
        (d, 0) => (reason::STAGED_WOULD_ALLOW, d - 1),
        _ => return verdict,
    };
    // New connections only, as every staged report: a tracked hairpin
    // (`pipeline::hairpin` tracks it at its ingress) was reported when new.
    let tracked = match (packet::parsed(scratch::SLOT_TC), config::get()) {
        (Some(pkt), Some(cfg)) => {
            conntrack::exists(&conntrack::key(endpoint, direction::INGRESS, pkt), cfg)
        }
        _ => true,
    };
    if tracked {
        return verdict;
    }
    verdict | (report as i32) << 8 | (dir as i32) << 16
}

/// The staged view's judgement of a new connection the enforced policy
/// judged (`enforced`: allowed or not) for an endpoint whose staged view
/// differs in direction `dir` (`isolated`: whether the staged view
/// isolates it), `peer` its peer: the report to send when the views
/// disagree ([`reason::STAGED_WOULD_DENY`], `STAGED_WOULD_ALLOW`), 0 when
/// they agree.
#[inline(always)]
pub fn staged_report(
    endpoint: u32,
    dir: u32,
    fam: u32,
    isolated: bool,
    packet: u64,
    peer: &[u8; 16],
    enforced: bool,
) -> u32 {
    let protocol = packet as u8;
    let dport = (packet >> 48) as u16;
    let staged = !isolated || allows(staged_endpoint(endpoint), dir, fam, protocol, dport, peer);
    match (staged, enforced) {
        (true, false) => reason::STAGED_WOULD_ALLOW,
        (false, true) => reason::STAGED_WOULD_DENY,
        _ => 0,
    }
}
