//! Pure policy compiler: a [`Snapshot`] in, the exact contents of one
//! node's policy maps out ([`compile`]), and the ordered map updates from
//! one output to the next ([`diff`]). [`Compiler`] does the same
//! incrementally: told what changed ([`Changes`]), it recompiles only the
//! local pods a change reaches and diffs only those, with the same result
//! as `compile` + `diff`. The agent's loop runs `Compiler::new` at start
//! and [`Compiler::update`] on every change, with the change set
//! [`Changes::between`] finds by comparing two versions of the snapshot.
//!
//! # What is compiled
//! - Per local endpoint (networked pod on the node): an id (stable while
//!   the pod lives, from the [`IdAllocation`] passed in and returned), an
//!   isolation flag per direction, a policy generation per direction (a
//!   content hash of what the direction allows, for revoking tracked
//!   connections when it changes), and the
//!   [`ALLOW_ANY_SOURCE_ANNOTATION`](crate::model::ALLOW_ANY_SOURCE_ANNOTATION)
//!   opt-out of anti-spoofing.
//! - Per isolated endpoint and direction, per family: LPM entries
//!   `(endpoint, direction, peer prefix) → rule set`. The value at each
//!   prefix is the union of the rule sets of every rule contribution whose
//!   prefix covers it and none of whose `except`s covers it, so the longest
//!   prefix match is exact for every address. Prefixes whose value equals
//!   the one they would inherit are left out; a prefix that allows nothing
//!   but shadows a shorter one gets [`EMPTY_RULESET`].
//! - Rule sets, deduplicated by content and shared: each a set of
//!   `(protocol, port range)`s, written to the port trie.
//! - Where policies are staged ([`crate::model::Staging`]): the staged
//!   view's entries for each endpoint direction it judges differently,
//!   keyed by the staged endpoint id, and the endpoint's staged flags
//!   (`staged.rs`). The enforced entries are those of the enforced view.
//! - Service frontends ([`frontends`]): every cluster, external and
//!   load-balancer IP of every Service with each of its ports, and this
//!   node's addresses with each node port, keyed by (address, port,
//!   protocol) and valued with their kind. They do not depend on pods or
//!   policies, and are compiled with or without a local node (node ports
//!   need its addresses).
//!
//! # Ids
//! Endpoint and rule-set ids come from the previous [`IdAllocation`] and
//! are returned in [`Compiled::ids`]. A rule-set id always means the same
//! content, and a new id is never one the previous allocation used, so a
//! [`diff`] never changes what an existing id means. New ids go to new pods
//! in pod order and to new rule sets in content order, so the output does
//! not depend on how it was computed (full or incremental).

mod diff;
mod frontends;
mod hash;
mod ids;
mod incremental;
mod local;
mod maps;
mod output;
mod peers;
mod prefixes;
mod ruleset;
mod staged;

pub use diff::{Diff, Op, diff};
pub use frontends::{ServiceFrontend, service_frontends};
pub use incremental::{Changes, Compiler};
pub use local::compile;
pub use maps::{MapContents, MapCounts, MapOp, MapState, RawOp};
pub use output::{
    Compiled, Decision, Direction, Endpoint, EndpointId, IdAllocation, PolicyEntry, PolicyTarget,
    RuleRef, Sizes, Stage, write_rule,
};
pub(crate) use prefixes::cluster_rules_of;
pub use ruleset::{PortPrefix, PortRange, RuleSet};

/// Rule-set id of the empty set: never has port entries, so a peer prefix
/// pointing at it is denied. Used where an `except` must shadow a shorter
/// prefix.
pub const EMPTY_RULESET: u32 = 1;

/// Largest endpoint id: the selector keeps the direction in its low bit,
/// and the staged view's entries set
/// [`STAGED_ENDPOINT_BIT`](netpol_common::STAGED_ENDPOINT_BIT).
pub const MAX_ENDPOINT_ID: u32 = netpol_common::STAGED_ENDPOINT_BIT - 1;
