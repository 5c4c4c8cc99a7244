//! `inspect staged`: what the staged view would change on this node, as
//! the agent's event reader sums it up (`netpol_agent::staged`).

use std::fmt::Write as _;

use netpol_agent::staged::Summary;

/// One line per pod pair, direction, port, family and report.
pub(super) fn staged_table(s: &Summary) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<24} {:<8} {:<10} {:<6} {:<11} {:>7} {:>12}  DECIDED (STAGED VIEW)",
        "SOURCE", "DESTINATION", "DIR", "PORT", "FAMILY", "WOULD", "COUNT", "LAST SEEN"
    );
    for r in &s.rows {
        let k = &r.key;
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:<8} {:<10} {:<6} {:<11} {:>7} {:>12}  {}{}",
            k.source,
            k.destination,
            k.direction,
            format!("{}/{}", k.protocol, k.port),
            k.family,
            k.report.trim_start_matches("staged_would_").to_owned(),
            r.count,
            format!("{}s ago", now.saturating_sub(r.last_seen_unix_secs)),
            r.decided,
            if r.staged_policies.is_empty() {
                String::new()
            } else {
                format!(" [staged: {}]", r.staged_policies.join(", "))
            }
        );
    }
    out
}
