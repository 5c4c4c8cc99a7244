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
/// protocol and port, ICMP included (a rule without `ports`), but those of
/// `except` (what a `ClusterNetworkPolicy` Deny took out of it). Ranges are
/// sorted, per protocol disjoint and non-adjacent, so equal sets are equal
/// values and can share one id.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleSet {
    /// Every protocol and port but `except`.
    pub all: bool,
    /// Allowed ranges (empty when `all`).
    pub ranges: Vec<PortRange>,
    /// With `all`: the ranges not allowed (empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<PortRange>,
}

/// One entry of the port trie for a rule set: `protocol: None` is every
/// protocol (prefix 32); otherwise the first `port_bits` bits of `port`
/// (prefix `48 + port_bits`). `allow: false` takes a block out of a
/// shorter entry's (the longest match decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortPrefix {
    /// Protocol, `None` for all.
    pub protocol: Option<Protocol>,
    /// First port of the block.
    pub port: u16,
    /// Significant bits of `port` (0..=16).
    pub port_bits: u8,
    /// Whether the block is allowed.
    pub allow: bool,
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
        (
            self.prefix_len(),
            key,
            PortValue {
                allow: u32::from(self.allow),
            },
        )
    }
}

impl RuleSet {
    /// Every protocol and port.
    #[must_use]
    pub fn allow_all() -> Self {
        Self {
            all: true,
            ranges: Vec::new(),
            except: Vec::new(),
        }
    }

    /// Whether nothing is allowed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.all && self.ranges.is_empty()
    }

    /// Whether everything is allowed.
    #[must_use]
    pub fn is_all(&self) -> bool {
        self.all && self.except.is_empty()
    }

    /// The normalised set of `ranges`.
    #[must_use]
    pub fn from_ranges(ranges: Vec<PortRange>) -> Self {
        Self {
            all: false,
            ranges: normalise(ranges),
            except: Vec::new(),
        }
    }

    /// Everything but `except`.
    #[must_use]
    pub fn all_but(except: Vec<PortRange>) -> Self {
        Self {
            all: true,
            ranges: Vec::new(),
            except: normalise(except),
        }
    }

    /// What this set does not allow.
    #[must_use]
    pub fn complement(&self) -> RuleSet {
        if self.all {
            Self::from_ranges(self.except.clone())
        } else {
            Self::all_but(self.ranges.clone())
        }
    }

    /// Union of two sets.
    #[must_use]
    pub fn union(&self, other: &RuleSet) -> RuleSet {
        match (self.all, other.all) {
            (false, false) => {
                let mut r = self.ranges.clone();
                r.extend_from_slice(&other.ranges);
                Self::from_ranges(r)
            }
            (true, false) => Self::all_but(minus(&self.except, &other.ranges)),
            (false, true) => Self::all_but(minus(&other.except, &self.ranges)),
            (true, true) => Self::all_but(intersect(&self.except, &other.except)),
        }
    }

    /// Intersection of two sets.
    #[must_use]
    pub fn intersect(&self, other: &RuleSet) -> RuleSet {
        match (self.all, other.all) {
            (false, false) => Self::from_ranges(intersect(&self.ranges, &other.ranges)),
            (true, false) => Self::from_ranges(minus(&other.ranges, &self.except)),
            (false, true) => Self::from_ranges(minus(&self.ranges, &other.except)),
            (true, true) => {
                let mut e = self.except.clone();
                e.extend_from_slice(&other.except);
                Self::all_but(e)
            }
        }
    }

    /// What this set allows and `other` does not.
    #[must_use]
    pub fn minus(&self, other: &RuleSet) -> RuleSet {
        self.intersect(&other.complement())
    }

    /// Whether the set allows `protocol` (IP protocol number) and
    /// destination `port`.
    #[must_use]
    pub fn allows(&self, protocol: u8, port: u16) -> bool {
        let listed = |list: &[PortRange]| {
            list.iter()
                .any(|r| r.protocol.number() == protocol && (r.first..=r.last).contains(&port))
        };
        if self.all {
            !listed(&self.except)
        } else {
            listed(&self.ranges)
        }
    }

    /// The port-trie prefixes encoding the set exactly: ranges split into
    /// aligned power-of-two blocks; with `all`, one entry for every
    /// protocol and the blocks of `except` not allowed.
    #[must_use]
    pub fn port_prefixes(&self) -> Vec<PortPrefix> {
        if self.all {
            let mut out = vec![PortPrefix {
                protocol: None,
                port: 0,
                port_bits: 0,
                allow: true,
            }];
            blocks(&self.except, false, &mut out);
            return out;
        }
        let mut out = Vec::new();
        blocks(&self.ranges, true, &mut out);
        out
    }
}

/// Sorted, merged (overlapping and adjacent) ranges.
fn normalise(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
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
    out
}

/// `a` without `b` (both normalised).
fn minus(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in a {
        // The parts of `r` left after every range of `b` of its protocol.
        let mut lo = u32::from(r.first);
        let hi = u32::from(r.last);
        for cut in b.iter().filter(|c| c.protocol == r.protocol) {
            let (cl, ch) = (u32::from(cut.first), u32::from(cut.last));
            if ch < lo || cl > hi {
                continue;
            }
            if cl > lo {
                out.push(range(r.protocol, lo, cl - 1));
            }
            lo = ch + 1;
            if lo > hi {
                break;
            }
        }
        if lo <= hi {
            out.push(range(r.protocol, lo, hi));
        }
    }
    normalise(out)
}

/// `a` and `b` (both normalised).
fn intersect(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in a {
        for s in b.iter().filter(|s| s.protocol == r.protocol) {
            let lo = r.first.max(s.first);
            let hi = r.last.min(s.last);
            if lo <= hi {
                out.push(PortRange {
                    protocol: r.protocol,
                    first: lo,
                    last: hi,
                });
            }
        }
    }
    normalise(out)
}

fn range(protocol: Protocol, first: u32, last: u32) -> PortRange {
    PortRange {
        protocol,
        first: u16::try_from(first).unwrap_or(u16::MAX),
        last: u16::try_from(last).unwrap_or(u16::MAX),
    }
}

/// `ranges` as aligned blocks of the port trie.
fn blocks(ranges: &[PortRange], allow: bool, out: &mut Vec<PortPrefix>) {
    for r in ranges {
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
                allow,
            });
            lo += 1 << size_log;
        }
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

    /// A random set over TCP/UDP/SCTP around the probed ports, with or
    /// without `all`.
    fn random_set(seed: &mut u64) -> RuleSet {
        let mut next = || {
            *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            *seed >> 33
        };
        let mut ranges = Vec::new();
        for _ in 0..next() % 4 {
            let protocol = Protocol::ALL[(next() % 3) as usize];
            let first = [0u16, 1, 53, 80, 1000, 65535][(next() % 6) as usize];
            let len = [0u16, 1, 27, 1000, 65535][(next() % 5) as usize];
            ranges.push(r(protocol, first, first.saturating_add(len)));
        }
        if next() % 2 == 0 {
            RuleSet::from_ranges(ranges)
        } else {
            RuleSet::all_but(ranges)
        }
    }

    /// The port trie's answer for `set`: the longest matching block.
    fn trie_allows(set: &RuleSet, protocol: u8, port: u16) -> bool {
        let mut best: Option<(u32, bool)> = None;
        for p in set.port_prefixes() {
            let matches = match p.protocol {
                None => true,
                Some(q) => {
                    let size = 1u32 << (16 - u32::from(p.port_bits));
                    q.number() == protocol
                        && (u32::from(p.port)..u32::from(p.port) + size).contains(&u32::from(port))
                }
            };
            if matches && best.is_none_or(|(len, _)| p.prefix_len() > len) {
                best = Some((p.prefix_len(), p.allow));
            }
        }
        best.is_some_and(|(_, allow)| allow)
    }

    #[test]
    fn set_operations_and_their_encoding_agree_with_the_sets_pointwise() {
        let mut seed = 7u64;
        let probes: Vec<(u8, u16)> = [1u8, 6, 17, 132]
            .into_iter()
            .flat_map(|p| {
                [
                    0u16, 1, 2, 52, 53, 54, 79, 80, 81, 999, 1000, 1027, 1028, 2000, 65534, 65535,
                ]
                .map(move |n| (p, n))
            })
            .collect();
        for _ in 0..400 {
            let (a, b) = (random_set(&mut seed), random_set(&mut seed));
            let ops = [
                ("union", a.union(&b)),
                ("intersect", a.intersect(&b)),
                ("minus", a.minus(&b)),
                ("complement", a.complement()),
            ];
            for &(proto, port) in &probes {
                let (x, y) = (a.allows(proto, port), b.allows(proto, port));
                for (name, set) in &ops {
                    let want = match *name {
                        "union" => x || y,
                        "intersect" => x && y,
                        "minus" => x && !y,
                        _ => !x,
                    };
                    assert_eq!(
                        set.allows(proto, port),
                        want,
                        "{name} of {a:?} and {b:?} at {proto}/{port}"
                    );
                    assert_eq!(
                        trie_allows(set, proto, port),
                        want,
                        "encoding of {set:?} at {proto}/{port}"
                    );
                }
            }
            // Normal forms: equal sets are equal values (one id).
            assert_eq!(a.union(&b), b.union(&a));
            assert_eq!(a.complement().complement(), a);
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
