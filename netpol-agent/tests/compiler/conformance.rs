//! Replays every `via: pod` cell of the shared conformance scenarios through
//! the compiler and the LPM simulator (no root, no kernel). Each step is
//! also applied through an incremental [`Compiler`], which must land on the
//! full compile with the same diff, and generations must move exactly for
//! the endpoint directions whose contents changed.

use std::path::{Path, PathBuf};

use netpol_agent::compiler::{Changes, Compiler, IdAllocation, compile, diff};
use netpol_agent::model::manifests::{LoadReport, apply_str, apply_value};
use netpol_agent::model::{Kind, ObjectRef, Protocol, Snapshot};
use netpol_testkit::compiler::{generation_violation, reference_connection, simulate_connection};
use serde::Deserialize;

#[derive(Deserialize)]
struct Scenario {
    name: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    #[serde(default)]
    apply: Vec<serde_yaml::Value>,
    #[serde(default)]
    delete: Vec<DeleteRef>,
    #[serde(default)]
    probes: Vec<Probe>,
}

#[derive(Deserialize)]
struct DeleteRef {
    kind: String,
    #[serde(default)]
    namespace: String,
    name: String,
}

#[derive(Deserialize)]
struct Probe {
    port: u16,
    protocol: String,
    families: Option<Vec<String>>,
    via: Option<String>,
    matrix: String,
}

fn conformance_dir() -> PathBuf {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance"
    ));
    assert!(
        dir.join("scenarios").is_dir() && dir.join("cluster.yaml").is_file(),
        "conformance suite missing: expected {} with cluster.yaml and scenarios/ \
         (the shared checkout next to the workspace)",
        dir.display()
    );
    dir.to_owned()
}

fn kind(k: &str) -> Kind {
    match k {
        "Pod" => Kind::Pod,
        "Namespace" => Kind::Namespace,
        "Node" => Kind::Node,
        "NetworkPolicy" => Kind::NetworkPolicy,
        other => panic!("unexpected kind {other}"),
    }
}

fn parse_ref(s: &str) -> ObjectRef {
    let (ns, name) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("bad pod {s:?} in matrix"));
    ObjectRef::new(ns, name)
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
    service_cells: usize,
    reference_disagreements: Vec<String>,
}

fn replay(path: &Path, base: &Snapshot, tally: &mut Tally) {
    let text = std::fs::read_to_string(path).expect("read scenario");
    let sc: Scenario =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut snap = base.clone();
    let mut prev = compile(&snap, &IdAllocation::default());
    let mut inc = Compiler::new(&snap, &IdAllocation::default());
    for (si, step) in sc.steps.iter().enumerate() {
        let before = snap.clone();
        for d in &step.delete {
            if matches!(d.kind.as_str(), "Service" | "EndpointSlice" | "Endpoints") {
                continue;
            }
            snap.remove(kind(&d.kind), &d.namespace, &d.name);
        }
        let mut report = LoadReport::default();
        for obj in &step.apply {
            let v = serde_json::to_value(obj).expect("yaml to json");
            apply_value(&mut snap, v, &sc.name, &mut report);
        }
        assert!(report.errors.is_empty(), "{}: {:?}", sc.name, report.errors);
        let compiled = compile(&snap, &prev.ids);
        assert!(
            compiled.errors.is_empty(),
            "{}: {:?}",
            sc.name,
            compiled.errors
        );
        // The diff from the previous step must land exactly on this one.
        let mut state = prev.map_state();
        state.apply(&diff(&prev, &compiled));
        assert_eq!(state, compiled.map_state(), "{} step {si}: diff", sc.name);
        let inc_diff = inc.update(&snap, &Changes::between(&before, &snap));
        assert_eq!(
            inc.compiled(),
            &compiled,
            "{} step {si}: incremental",
            sc.name
        );
        assert_eq!(
            inc_diff,
            diff(&prev, &compiled),
            "{} step {si}: incremental diff",
            sc.name
        );
        if let Some(v) = generation_violation(&prev, &compiled) {
            panic!("{} step {si}: {v}", sc.name);
        }
        for probe in &step.probes {
            let rows: Vec<Vec<&str>> = probe
                .matrix
                .lines()
                .map(|l| l.split_whitespace().collect())
                .filter(|l: &Vec<&str>| !l.is_empty())
                .collect();
            let header = &rows[0][1..];
            let families: Vec<String> = probe
                .families
                .clone()
                .unwrap_or_else(|| vec!["ipv4".into(), "ipv6".into()]);
            let cells = (rows.len() - 1) * header.len() * families.len();
            if probe.via.as_deref().unwrap_or("pod") != "pod" {
                tally.service_cells += cells;
                continue;
            }
            let proto = Protocol::parse(&probe.protocol)
                .unwrap_or_else(|| panic!("protocol {}", probe.protocol))
                .number();
            for row in &rows[1..] {
                let src = &snap.pods[&parse_ref(row[0])];
                for (col, expect) in header.iter().zip(&row[1..]) {
                    let dst = &snap.pods[&parse_ref(col)];
                    for fam in &families {
                        let v6 = fam == "ipv6";
                        let want = *expect == "X";
                        let got = simulate_connection(&state, src, dst, v6, proto, probe.port);
                        let line = format!(
                            "{} step {si} {}/{} {fam} via: pod: {} -> {} expected {} got {}",
                            sc.name,
                            probe.port,
                            probe.protocol,
                            row[0],
                            col,
                            if want { "X" } else { "." },
                            if got { "X" } else { "." }
                        );
                        if got == want {
                            tally.passed += 1;
                        } else {
                            tally.failed.push(line.clone());
                        }
                        if reference_connection(&snap, src, dst, v6, proto, probe.port) != want {
                            tally.reference_disagreements.push(line);
                        }
                    }
                }
            }
        }
        prev = compiled;
    }
}

#[test]
fn every_pod_cell_of_every_conformance_scenario_passes() {
    let dir = conformance_dir();
    let mut base = Snapshot::default();
    let mut report = LoadReport::default();
    let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).expect("read cluster.yaml");
    apply_str(&mut base, &cluster, "cluster.yaml", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(base.pods.len(), 9);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("scenarios"))
        .expect("read scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    let mut tally = Tally::default();
    for f in &files {
        replay(f, &base, &mut tally);
    }
    println!(
        "conformance: {} passed, {} failed ({} scenarios; {} via: service cells skipped)",
        tally.passed,
        tally.failed.len(),
        files.len(),
        tally.service_cells
    );
    for l in &tally.failed {
        println!("{l}");
    }
    assert!(
        tally.failed.is_empty(),
        "{} cells failed",
        tally.failed.len()
    );
    assert!(tally.passed > 0);
    assert!(
        tally.reference_disagreements.is_empty(),
        "reference evaluator disagrees with the scenarios: {:#?}",
        tally.reference_disagreements
    );
}
