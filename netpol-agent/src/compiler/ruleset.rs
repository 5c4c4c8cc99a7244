//! Rule sets: what a matched peer may use, as `(protocol, port range)`s,
//! and their encoding as port-trie prefixes.

use netpol_common::{PORT_KEY_PROTOCOL_BITS, PortKey, PortValue, SELECTOR_BITS};
use serde::Serialize;

use crate::model::Protocol;

/// Ports `first..=last` of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    /// Protocol.
    pub protocol: Protocol,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

/// A normalised set of allowed `(protocol, port)`s. `all` is every
/// protocol and port, ICMP included (a rule without `ports`). Ranges are
/// sorted, per protocol disjoint and non-adjacent, so equal sets are equal
/// values and can share one id.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleSet {
    /// Every protocol and port.
    pub all: bool,
    /// Allowed ranges (empty when `all`).
    pub ranges: Vec<PortRange>,
}

/// One entry of the port trie for a rule set: `protocol: None` is every
/// protocol (prefix 32); otherwise the first `port_bits` bits of `port`
/// (prefix `48 + port_bits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortPrefix {
    /// Protocol, `None` for all.
    pub protocol: Option<Protocol>,
    /// First port of the block.
    pub port: u16,
    /// Significant bits of `port` (0..=16).
    pub port_bits: u8,
}

impl PortPrefix {
    /// LPM prefix length of the key.
    #[must_use]
    pub fn prefix_len(&self) -> u32 {
        match self.protocol {
            None => SELECTOR_BITS,
            Some(_) => PORT_KEY_PROTOCOL_BITS + u32::from(self.port_bits),
        }
    }

    /// The exact key and value of the port trie for rule set `ruleset`.
    #[must_use]
    pub fn raw(&self, ruleset: u32) -> (u32, PortKey, PortValue) {
        let key = PortKey {
            ruleset,
            protocol: self.protocol.map_or(0, Protocol::number),
            _pad: 0,
            port: if self.protocol.is_some() {
                self.port.to_be_bytes()
            } else {
                [0, 0]
            },
        };
        (self.prefix_len(), key, PortValue { allow: 1 })
    }
}

impl RuleSet {
    /// Every protocol and port.
    #[must_use]
    pub fn allow_all() -> Self {
        Self {
            all: true,
            ranges: Vec::new(),
        }
    }

    /// Whether nothing is allowed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.all && self.ranges.is_empty()
    }

    /// The normalised set of `ranges`.
    #[must_use]
    pub fn from_ranges(mut ranges: Vec<PortRange>) -> Self {
        ranges.sort_unstable();
        let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            if let Some(last) = out.last_mut()
                && last.protocol == r.protocol
                && u32::from(r.first) <= u32::from(last.last) + 1
            {
                last.last = last.last.max(r.last);
                continue;
            }
            out.push(r);
        }
        Self {
            all: false,
            ranges: out,
        }
    }

    /// Union of two sets.
    #[must_use]
    pub fn union(&self, other: &RuleSet) -> RuleSet {
        if self.all || other.all {
            return Self::allow_all();
        }
        let mut r = self.ranges.clone();
        r.extend_from_slice(&other.ranges);
        Self::from_ranges(r)
    }

    /// Whether the set allows `protocol` (IP protocol number) and
    /// destination `port`.
    #[must_use]
    pub fn allows(&self, protocol: u8, port: u16) -> bool {
        self.all
            || self
                .ranges
                .iter()
                .any(|r| r.protocol.number() == protocol && (r.first..=r.last).contains(&port))
    }

    /// The port-trie prefixes encoding the set exactly: ranges split into
    /// aligned power-of-two blocks.
    #[must_use]
    pub fn port_prefixes(&self) -> Vec<PortPrefix> {
        if self.all {
            return vec![PortPrefix {
                protocol: None,
                port: 0,
                port_bits: 0,
            }];
        }
        let mut out = Vec::new();
        for r in &self.ranges {
            let mut lo = u32::from(r.first);
            let hi = u32::from(r.last);
            while lo <= hi {
                // Largest aligned block starting at `lo` that stays in range.
                let mut size_log = if lo == 0 {
                    16
                } else {
                    lo.trailing_zeros().min(16)
                };
                while lo + (1 << size_log) - 1 > hi {
                    size_log -= 1;
                }
                out.push(PortPrefix {
                    protocol: Some(r.protocol),
                    port: u16::try_from(lo).unwrap_or(u16::MAX),
                    port_bits: u8::try_from(16 - size_log).unwrap_or(16),
                });
                lo += 1 << size_log;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(protocol: Protocol, first: u16, last: u16) -> PortRange {
        PortRange {
            protocol,
            first,
            last,
        }
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let s = RuleSet::from_ranges(vec![
            r(Protocol::Tcp, 80, 90),
            r(Protocol::Udp, 1, 1),
            r(Protocol::Tcp, 91, 95),
            r(Protocol::Tcp, 85, 86),
        ]);
        assert_eq!(
            s.ranges,
            vec![r(Protocol::Tcp, 80, 95), r(Protocol::Udp, 1, 1)]
        );
    }

    #[test]
    fn full_port_range_is_one_protocol_prefix() {
        let s = RuleSet::from_ranges(vec![r(Protocol::Sctp, 0, 65535)]);
        let p = s.port_prefixes();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].prefix_len(), 48);
    }

    #[test]
    fn range_splits_into_aligned_blocks_covering_exactly() {
        for (a, b) in [
            (1u16, 65535u16),
            (80, 80),
            (1000, 2000),
            (65535, 65535),
            (0, 1),
        ] {
            let s = RuleSet::from_ranges(vec![r(Protocol::Tcp, a, b)]);
            let prefixes = s.port_prefixes();
            let mut covered = 0u32;
            for p in &prefixes {
                let size = 1u32 << (16 - p.port_bits);
                assert_eq!(u32::from(p.port) % size, 0, "block not aligned");
                covered += size;
            }
            assert_eq!(covered, u32::from(b) - u32::from(a) + 1);
        }
    }

    #[test]
    fn allow_all_is_one_prefix_of_length_32() {
        let p = RuleSet::allow_all().port_prefixes();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].raw(7).0, 32);
        assert_eq!(p[0].raw(7).1.protocol, 0);
    }
}
