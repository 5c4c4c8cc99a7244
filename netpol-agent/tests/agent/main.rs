//! The agent as a whole: its files and kube sources, readiness, pod
//! interfaces coming and going in a node namespace, restarts of the
//! binary without disruption; the baseline the benchmarks compare with;
//! the deploy manifests and the start-up check.
mod baseline_restore;
mod deploy_manifests;
mod deploy_preflight;
mod files;
mod kube;
mod kube_ready;
mod netns;
mod restart;
