//! The policy lookup: the peer's longest matching prefix gives a rule set,
//! the rule set's port trie decides the protocol and port.
use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    PORT_KEY_PROTOCOL_BITS, PolicyKeyV4, PolicyKeyV6, PortKey, SELECTOR_BITS, family,
    policy_selector, reason, staged_endpoint,
};

use crate::maps::{NETPOL_POLICY_V4, NETPOL_POLICY_V6, NETPOL_PORTS};

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
/// pod's own address, as the peer. A *global* function, as
/// `netpol_deny_event` is, so the verifier checks its two lookups once on
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
    let judged =
        |dir: u32, bit: u32| flags & bit == 0 || allows(endpoint, dir, fam, protocol, dport, &own);
    i32::from(
        judged(
            netpol_common::direction::EGRESS,
            netpol_common::endpoint_flags::EGRESS_ISOLATED,
        ) && judged(
            netpol_common::direction::INGRESS,
            netpol_common::endpoint_flags::INGRESS_ISOLATED,
        ),
    )
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
