//! The datapath through the library, no agent: verdicts of the real
//! programs through `BPF_PROG_TEST_RUN` (`packets`, `hardening`,
//! `services`, `events`), real traffic across network namespaces
//! (`netns`), both attach paths (`attach`) and adoption after a restart
//! (`smoke`). `cargo xtask vm-test` runs this binary on every kernel of
//! its matrix, `events` aside.
mod attach;
mod events;
mod hardening;
mod netns;
mod packets;
mod services;
mod smoke;
