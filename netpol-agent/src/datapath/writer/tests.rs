use netpol_common::{EndpointInfo, FrontendKeyV4, FrontendValue, PortKey, PortValue, maps};

use super::*;

fn pod(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "x".into(),
        name: name.into(),
    }
}

fn port(ruleset: u32, p: u16) -> RawOp {
    RawOp::PortUpsert(
        64,
        PortKey {
            ruleset,
            protocol: 6,
            _pad: 0,
            port: p.to_be_bytes(),
        },
        PortValue { allow: 1 },
    )
}

#[test]
fn full_map_refuses_the_whole_apply_and_keeps_the_previous_state() {
    let mut fake = FakeBackend::default();
    fake.capacity.insert(maps::PORTS, 2);
    let mut w = MapWriter::new(fake, Mirror::default());
    let ifaces = BTreeMap::new();
    w.apply(&[port(2, 80)], &ifaces).expect("fits");
    let before = w.mirror().clone();

    let err = w
        .apply(&[port(3, 81), port(3, 82), port(3, 83)], &ifaces)
        .expect_err("third entry does not fit");
    assert!(
        matches!(
            err,
            MapWriteError::Full {
                map: maps::PORTS,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(maps::PORTS), "{err}");
    assert_eq!(w.mirror(), &before);
    assert_eq!(w.backend().state, before);
    assert_eq!(w.full_errors(), 1);
}

#[test]
fn connections_of_a_deleted_endpoint_are_purged() {
    let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
    let ifaces: BTreeMap<ObjectRef, u32> = [(pod("a"), 7), (pod("b"), 8)].into_iter().collect();
    let info = |id| EndpointInfo {
        id,
        ..EndpointInfo::default()
    };
    w.apply(
        &[
            RawOp::EndpointUpsert(pod("a"), info(3)),
            RawOp::EndpointUpsert(pod("b"), info(4)),
        ],
        &ifaces,
    )
    .expect("apply");
    // b's interface now carries a new pod (new id); a is deleted.
    w.apply(
        &[
            RawOp::EndpointUpsert(pod("b"), info(5)),
            RawOp::EndpointDelete(pod("a")),
        ],
        &ifaces,
    )
    .expect("apply");
    assert_eq!(w.backend().purged, vec![3, 4]);
}

#[test]
fn endpoint_updates_are_keyed_by_interface_and_skipped_without_one() {
    let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
    let ifaces: BTreeMap<ObjectRef, u32> = [(pod("a"), 7)].into_iter().collect();
    let info = EndpointInfo {
        id: 3,
        flags: 1,
        ..EndpointInfo::default()
    };
    let r = w
        .apply(
            &[
                RawOp::EndpointUpsert(pod("a"), info),
                RawOp::EndpointUpsert(pod("b"), info),
            ],
            &ifaces,
        )
        .expect("apply");
    assert_eq!(r.skipped, vec![pod("b")]);
    assert_eq!(w.backend().state.endpoints.get(&7), Some(&info));
    assert_eq!(r.counts.endpoints, 1);
}

fn programmed(id: u32) -> EndpointInfo {
    EndpointInfo {
        id,
        flags: netpol_common::endpoint_flags::HAS_IPV4,
        ..EndpointInfo::default()
    }
}

fn unprogrammed(id: u32) -> EndpointInfo {
    EndpointInfo {
        id,
        flags: netpol_common::endpoint_flags::NOT_PROGRAMMED,
        ..EndpointInfo::default()
    }
}

fn slotted(slots: u32) -> FakeMapWriter {
    let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
    w.set_mark_slots(slots);
    w
}

fn slot_of(w: &FakeMapWriter, ifindex: u32) -> u32 {
    let slot = w.mirror().endpoints[&ifindex].slot;
    if slot != 0 {
        assert_eq!(w.mirror().slots.get(&slot), Some(&ifindex));
    }
    assert_eq!(w.backend().state, *w.mirror());
    slot
}

fn frontend(last: u8) -> KernelOp {
    KernelOp::FrontendV4Upsert(
        FrontendKeyV4 {
            addr: [10, 43, 0, last],
            port: 80u16.to_be_bytes(),
            protocol: 6,
            _pad: 0,
        },
        FrontendValue {
            kind: netpol_common::frontend_kind::CLUSTER_IP,
        },
    )
}

#[test]
fn slots_are_the_lowest_free_set_before_their_entry_and_stable_across_updates() {
    let mut w = slotted(4);
    w.apply_kernel(&[
        KernelOp::EndpointUpsert(7, programmed(3)),
        KernelOp::EndpointUpsert(8, programmed(4)),
    ])
    .expect("apply");
    assert_eq!((slot_of(&w, 7), slot_of(&w, 8)), (1, 2));
    let mut with_slot = programmed(3);
    with_slot.slot = 1;
    assert_eq!(
        w.backend().log[..2],
        [
            KernelOp::SlotSet(1, 7),
            KernelOp::EndpointUpsert(7, with_slot)
        ]
    );
    // A new policy generation, a caller's slot: the slot stays.
    let logged = w.backend().log.len();
    let mut next = programmed(3);
    next.egress_gen = 9;
    next.slot = 4;
    w.apply_kernel(&[KernelOp::EndpointUpsert(7, next)])
        .expect("apply");
    assert_eq!(slot_of(&w, 7), 1);
    assert_eq!(w.backend().log.len(), logged + 1, "{:?}", w.backend().log);
    assert_eq!(w.counts().mark_sources, 2);
}

#[test]
fn released_slots_are_cleared_after_their_entry_and_reused() {
    let mut w = slotted(4);
    w.apply_kernel(&[
        KernelOp::EndpointUpsert(7, programmed(3)),
        KernelOp::EndpointUpsert(8, programmed(4)),
    ])
    .expect("apply");
    w.apply_kernel(&[KernelOp::EndpointDelete(7)])
        .expect("apply");
    assert_eq!(
        w.backend().log[w.backend().log.len() - 2..],
        [KernelOp::EndpointDelete(7), KernelOp::SlotClear(1)]
    );
    w.apply_kernel(&[KernelOp::EndpointUpsert(8, unprogrammed(8))])
        .expect("apply");
    assert_eq!(slot_of(&w, 8), 0);
    assert_eq!(
        w.backend().log[w.backend().log.len() - 2..],
        [
            KernelOp::EndpointUpsert(8, unprogrammed(8)),
            KernelOp::SlotClear(2)
        ]
    );
    assert!(w.mirror().slots.is_empty());
    w.apply_kernel(&[
        KernelOp::EndpointUpsert(9, programmed(5)),
        KernelOp::EndpointUpsert(8, programmed(4)),
    ])
    .expect("apply");
    assert_eq!((slot_of(&w, 9), slot_of(&w, 8)), (1, 2));
}

#[test]
fn exhausted_slots_give_slot_zero_without_error_until_one_frees() {
    let mut w = slotted(1);
    w.apply_kernel(&[
        KernelOp::EndpointUpsert(7, programmed(3)),
        KernelOp::EndpointUpsert(8, programmed(4)),
    ])
    .expect("no free slot is no error");
    assert_eq!((slot_of(&w, 7), slot_of(&w, 8)), (1, 0));
    // Once 7 is gone, the next apply gives 8 the freed slot.
    w.apply_kernel(&[KernelOp::EndpointDelete(7)])
        .expect("apply");
    w.apply_kernel(&[]).expect("apply");
    assert_eq!(slot_of(&w, 8), 1);
}

#[test]
fn marking_off_hands_out_no_slot_and_clears_those_in_use() {
    let mut w = slotted(0);
    w.apply_kernel(&[KernelOp::EndpointUpsert(7, programmed(3))])
        .expect("apply");
    assert_eq!(slot_of(&w, 7), 0);
    assert!(
        w.backend()
            .log
            .iter()
            .all(|op| !matches!(op, KernelOp::SlotSet(..)))
    );
    w.set_mark_slots(2);
    w.apply_kernel(&[]).expect("apply");
    assert_eq!(slot_of(&w, 7), 1);
    w.set_mark_slots(0);
    w.apply_kernel(&[]).expect("apply");
    assert_eq!(slot_of(&w, 7), 0);
    assert!(w.mirror().slots.is_empty());
}

#[test]
fn slots_read_back_from_pinned_maps_are_kept_and_stale_ones_cleared() {
    let mut adopted = Mirror::default();
    let mut info = programmed(3);
    info.slot = 2;
    adopted.endpoints.insert(7, info);
    adopted.slots.insert(2, 7);
    // A slot whose interface has no entry (a crash between writes).
    adopted.slots.insert(5, 9);
    let fake = FakeBackend {
        state: adopted.clone(),
        ..FakeBackend::default()
    };
    let mut w = MapWriter::new(fake, adopted);
    w.set_mark_slots(8);
    w.apply_kernel(&[KernelOp::EndpointUpsert(8, programmed(4))])
        .expect("apply");
    assert_eq!((slot_of(&w, 7), slot_of(&w, 8)), (2, 1));
    assert_eq!(
        w.mirror().slots,
        BTreeMap::from([(1, 8), (2, 7)]),
        "slot 5 cleared"
    );
}

#[test]
fn rollback_after_a_full_map_restores_slots_and_frontends() {
    let mut w = slotted(4);
    w.apply_kernel(&[frontend(1), KernelOp::EndpointUpsert(7, programmed(3))])
        .expect("apply");
    let before = w.mirror().clone();
    let mut fake = w.backend().clone();
    fake.capacity.insert(maps::PORTS, 0);
    let mut w = MapWriter::new(fake, before.clone());
    w.set_mark_slots(4);
    let err = w
        .apply(
            &[
                RawOp::FrontendV4Upsert(
                    FrontendKeyV4 {
                        addr: [10, 43, 0, 2],
                        ..FrontendKeyV4::default()
                    },
                    FrontendValue { kind: 1 },
                ),
                RawOp::EndpointUpsert(pod("b"), programmed(4)),
                RawOp::EndpointDelete(pod("a")),
                port(2, 80),
            ],
            &BTreeMap::from([(pod("a"), 7), (pod("b"), 8)]),
        )
        .expect_err("ports full");
    assert!(
        matches!(
            err,
            MapWriteError::Full {
                map: maps::PORTS,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(w.mirror(), &before);
    assert_eq!(w.backend().state, before);
    assert_eq!(w.mirror().slots, BTreeMap::from([(1, 7)]));
    assert_eq!(w.mirror().frontends_v4.len(), 1);
}

#[test]
fn full_frontend_map_names_it() {
    let mut fake = FakeBackend::default();
    fake.capacity.insert(maps::FRONTENDS_V4, 1);
    let mut w = MapWriter::new(fake, Mirror::default());
    let err = w
        .apply_kernel(&[frontend(1), frontend(2)])
        .expect_err("second frontend does not fit");
    assert!(err.to_string().contains(maps::FRONTENDS_V4), "{err}");
    assert!(w.mirror().frontends_v4.is_empty());
}

#[test]
fn rollback_restores_updated_values_not_just_inserts() {
    let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
    let ifaces: BTreeMap<ObjectRef, u32> = [(pod("a"), 7)].into_iter().collect();
    let old = EndpointInfo {
        id: 3,
        flags: 0,
        ..EndpointInfo::default()
    };
    w.apply(&[RawOp::EndpointUpsert(pod("a"), old)], &ifaces)
        .expect("apply");
    let mut fake = w.backend().clone();
    fake.capacity.insert(maps::PORTS, 0);
    let mut w = MapWriter::new(fake, w.mirror().clone());
    let new = EndpointInfo {
        id: 3,
        flags: 3,
        ..EndpointInfo::default()
    };
    w.apply(
        &[RawOp::EndpointUpsert(pod("a"), new), port(2, 80)],
        &ifaces,
    )
    .expect_err("ports full");
    assert_eq!(w.backend().state.endpoints.get(&7), Some(&old));
}
