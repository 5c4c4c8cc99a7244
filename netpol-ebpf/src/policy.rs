//! The policy lookup: the peer's longest matching prefix gives a rule set,
//! the rule set's port trie decides the protocol and port.
use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    PORT_KEY_PROTOCOL_BITS, PolicyKeyV4, PolicyKeyV6, PortKey, SELECTOR_BITS, family,
    policy_selector,
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
