//! Why a packet got its verdict. One table for passes and drops: it is the
//! counter index and the metric label set. Numbers are never reused; retired
//! reasons keep their slot.

/// Passed: the interface has no endpoint entry (not managed by netpol).
pub const PASS_UNMANAGED: u32 = 0;
/// Passed: the endpoint is not isolated in this direction.
pub const PASS_NOT_ISOLATED: u32 = 1;
/// Passed: the packet belongs to a tracked connection (or is a reply).
pub const PASS_TRACKED: u32 = 2;
/// Passed: a policy rule allows the peer and port.
pub const PASS_POLICY: u32 = 3;
/// Passed: IPv6 neighbour discovery, router messages or MLD.
pub const PASS_ICMPV6_CONTROL: u32 = 4;
/// Passed: sent by the node itself to its pod (kubelet probes).
pub const PASS_NODE_ORIGIN: u32 = 5;
/// Passed: not an IP packet (ARP).
pub const PASS_NON_IP: u32 = 6;
/// Passed: the pod interface is not programmed yet and the new-pods mode
/// is fail-open.
pub const PASS_NEW_POD_OPEN: u32 = 7;
/// Passed: an ICMP error about a tracked connection.
pub const PASS_RELATED: u32 = 8;
/// Passed: a later fragment of an allowed first fragment.
pub const PASS_FRAGMENT: u32 = 9;
/// Passed, marked: a packet of an egress-isolated pod to a Service
/// frontend, judged once kube-proxy has chosen the backend (at the
/// backend's `to_pod` or at `leave_node`).
pub const PASS_SERVICE: u32 = 10;
/// Passed: a pod reaching itself through one of its Services (hairpin);
/// a pod's traffic to itself is not subject to its policies.
pub const PASS_HAIRPIN: u32 = 11;

/// First drop reason; everything at or above it is a drop.
pub const FIRST_DROP: u32 = 64;
/// Dropped: the endpoint is isolated and no rule matches.
pub const DROP_POLICY: u32 = 64;
/// Dropped: headers could not be parsed for an isolated endpoint.
pub const DROP_PARSE: u32 = 65;
/// Dropped: the pod interface is not programmed yet (fail-closed new pods).
pub const DROP_NOT_PROGRAMMED: u32 = 66;
/// Retired (IPv6 extension headers are walked now); never reused.
pub const DROP_IPV6_EXTENSION: u32 = 67;
/// Dropped: a later fragment whose first fragment was not seen (or was
/// denied), for an isolated endpoint.
pub const DROP_FRAGMENT: u32 = 68;
/// Dropped: a first fragment too short to hold the transport ports.
pub const DROP_FRAGMENT_SHORT: u32 = 69;
/// Dropped: a fragment overlapping one already seen.
pub const DROP_FRAGMENT_OVERLAP: u32 = 70;
/// Dropped: sent by a pod from an address that is not its own.
pub const DROP_SPOOFED: u32 = 71;
/// Dropped: a tracked connection the endpoint's new policy no longer
/// allows.
pub const DROP_REVOKED: u32 = 72;
/// Dropped: a packet marked for judgement after Service translation
/// whose mark names no current pod interface (the pod is gone, or the
/// mark is not netpol's).
pub const DROP_MARK_STALE: u32 = 73;

/// Not a verdict (never counted, never a packet's fate): reported on the
/// events ring when the staged view would deny a new connection the
/// enforced policy allows.
pub const STAGED_WOULD_DENY: u32 = 120;
/// The same when the staged view would allow one the enforced policy
/// denies.
pub const STAGED_WOULD_ALLOW: u32 = 121;

/// Whether `reason` is a staged view's report, not a verdict.
#[must_use]
pub const fn is_staged(reason: u32) -> bool {
    matches!(reason, STAGED_WOULD_DENY | STAGED_WOULD_ALLOW)
}

/// Slots per (direction, family) in the counter array.
pub const SLOTS: u32 = 128;

/// Whether `reason` is a drop.
#[must_use]
pub const fn is_drop(reason: u32) -> bool {
    reason >= FIRST_DROP
}

/// Stable name of a reason, used as a metric label and in `stats` output.
#[must_use]
pub const fn name(reason: u32) -> &'static str {
    match reason {
        PASS_UNMANAGED => "pass_unmanaged",
        PASS_NOT_ISOLATED => "pass_not_isolated",
        PASS_TRACKED => "pass_tracked",
        PASS_POLICY => "pass_policy",
        PASS_ICMPV6_CONTROL => "pass_icmpv6_control",
        PASS_NODE_ORIGIN => "pass_node_origin",
        PASS_NON_IP => "pass_non_ip",
        PASS_NEW_POD_OPEN => "pass_new_pod_open",
        PASS_RELATED => "pass_related",
        PASS_FRAGMENT => "pass_fragment",
        PASS_SERVICE => "pass_service",
        PASS_HAIRPIN => "pass_hairpin",
        DROP_POLICY => "drop_policy",
        DROP_PARSE => "drop_parse",
        DROP_NOT_PROGRAMMED => "drop_not_programmed",
        DROP_IPV6_EXTENSION => "drop_ipv6_extension",
        DROP_FRAGMENT => "drop_fragment",
        DROP_FRAGMENT_SHORT => "drop_fragment_short",
        DROP_FRAGMENT_OVERLAP => "drop_fragment_overlap",
        DROP_SPOOFED => "drop_spoofed",
        DROP_REVOKED => "drop_revoked",
        DROP_MARK_STALE => "drop_mark_stale",
        STAGED_WOULD_DENY => "staged_would_deny",
        STAGED_WOULD_ALLOW => "staged_would_allow",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use crate::reason;

    #[test]
    fn drop_reasons_start_at_first_drop() {
        assert!(!reason::is_drop(reason::PASS_NON_IP));
        assert!(reason::is_drop(reason::DROP_POLICY));
        assert_eq!(reason::name(reason::DROP_PARSE), "drop_parse");
    }
}
