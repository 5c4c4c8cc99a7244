//! The datapath through the library, no agent: verdicts of the real
//! programs through `BPF_PROG_TEST_RUN` (`packets`, `hardening`,
//! `services`, `events`), real traffic across network namespaces
//! (`netns`), both attach paths (`attach`) and adoption after a restart
//! (`smoke`). `cargo xtask vm-test` runs this binary on every kernel of
//! its matrix, `events` aside.
/// x/a's Service s-a: 10.96.0.1 and fd00:96::1, TCP 80 → 8080 (a
/// manifest, for `concat!`).
macro_rules! service_s_a {
    () => {
        r#"
apiVersion: v1
kind: Service
metadata: {name: s-a, namespace: x}
spec:
  clusterIPs: [10.96.0.1, "fd00:96::1"]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
"#
    };
}

mod attach;
mod events;
mod hardening;
mod netns;
mod packets;
mod services;
mod smoke;
