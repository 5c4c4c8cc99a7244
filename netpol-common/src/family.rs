//! Address family of a packet, as counted.

/// Not IP (ARP, LLDP, ...).
pub const OTHER: u32 = 0;
/// IPv4.
pub const IPV4: u32 = 1;
/// IPv6.
pub const IPV6: u32 = 2;
/// Number of families.
pub const COUNT: u32 = 3;

/// The family's name in logs, metrics and `stats`.
#[must_use]
pub const fn name(f: u32) -> &'static str {
    match f {
        IPV4 => "ipv4",
        IPV6 => "ipv6",
        OTHER => "other",
        _ => "unknown",
    }
}
