//! The `files` source: a folder of multi-document YAML/JSON manifests
//! ([`Folder`]: per-file fragments, per-object retention, consistent
//! reads), watched with `notify`. Each rescan runs off the async
//! runtime's threads, so a slow or huge folder never stalls the agent's
//! HTTP endpoints or its reconcile loop.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::Watcher as _;

use super::{Input, InputSender};
pub use crate::model::folder::{Folder, FolderError};

/// The manifests folder cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Listing the folder failed.
    #[error(transparent)]
    Read(#[from] FolderError),
    /// A rescan panicked; the next event starts over.
    #[error("rescanning the manifests folder panicked: {0}")]
    Panicked(String),
    /// The watch could not be set up.
    #[error("watching manifests folder {path}: {source}")]
    Watch {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: notify::Error,
    },
}

/// How soon a folder with a file still being written is read again.
const UNSETTLED_RETRY: Duration = Duration::from_secs(1);

/// The folder, watched.
#[derive(Debug)]
pub struct FilesSource {
    folder: Folder,
    metrics: Option<Arc<crate::status::Metrics>>,
}

impl FilesSource {
    /// A source over `dir`; nothing is read until [`Self::rescan`].
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            folder: Folder::new(dir),
            metrics: None,
        }
    }

    /// Shows `metrics` (and so `/healthz`) that it is alive after every
    /// rescan and while idle.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<crate::status::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn alive(&self) {
        if let Some(m) = &self.metrics {
            m.alive(crate::status::Task::Source);
        }
    }

    /// The folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.folder.dir()
    }

    /// Reads the folder again (see [`Folder::rescan`]) and returns the
    /// union, and whether a file was still being written.
    ///
    /// # Errors
    /// When the folder itself cannot be listed; unreadable or broken files
    /// are problems of the returned [`Input`].
    pub fn rescan(&mut self) -> Result<Input, FilesError> {
        Ok(self.rescan_settled()?.0)
    }

    fn rescan_settled(&mut self) -> Result<(Input, bool), FilesError> {
        let loaded = self.folder.rescan()?;
        let input = Input {
            snapshot: loaded.snapshot,
            problems: loaded.problems.iter().map(ToString::to_string).collect(),
        };
        Ok((input, loaded.unsettled))
    }

    /// [`Self::rescan`] on a blocking thread; the source comes back with
    /// the result.
    async fn rescan_off_runtime(mut self) -> (Self, Result<(Input, bool), FilesError>) {
        let dir = self.dir().to_owned();
        let metrics = self.metrics.clone();
        match tokio::task::spawn_blocking(move || {
            let r = self.rescan_settled();
            (self, r)
        })
        .await
        {
            Ok(done) => done,
            // The rescan panicked: nothing of it survives; start over.
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "manifests rescan failed");
                let fresh = Self {
                    folder: Folder::new(dir),
                    metrics,
                };
                (fresh, Err(FilesError::Panicked(e.to_string())))
            }
        }
    }

    /// Publishes the folder's [`Input`] on `tx` now and after every change
    /// until `stop` turns true. Bursts of file events are coalesced: each
    /// wake-up rescans once. A folder deleted and created again is
    /// watched again.
    ///
    /// # Errors
    /// When the folder cannot be read or watched at the start; later read
    /// errors are logged, the last state kept, and retried on the next
    /// event.
    pub async fn run(
        self,
        tx: InputSender,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), FilesError> {
        let dir = self.dir().to_owned();
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let within = dir.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match &res {
                Err(e) => tracing::warn!(error = %e, "manifest watch error"),
                // The parent folder is watched for the folder itself only.
                Ok(ev)
                    if !ev.paths.is_empty() && !ev.paths.iter().any(|p| p.starts_with(&within)) =>
                {
                    return;
                }
                Ok(_) => {}
            }
            let _ = ev_tx.send(());
        })
        .map_err(|source| FilesError::Watch {
            path: dir.clone(),
            source,
        })?;
        let watch_err = |source| FilesError::Watch {
            path: dir.clone(),
            source,
        };
        watcher
            .watch(&dir, notify::RecursiveMode::Recursive)
            .map_err(watch_err)?;
        // Its parent tells when the folder is deleted and created again.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = watcher.watch(parent, notify::RecursiveMode::NonRecursive);
        }
        let mut watched = folder_id(&dir);
        let (mut src, first) = self.rescan_off_runtime().await;
        src.alive();
        let (mut last, mut unsettled) = first?;
        publish(&tx, &last, &dir);
        let mut alive = tokio::time::interval(crate::status::ALIVE_EVERY);
        loop {
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => return Ok(()),
                _ = alive.tick() => {
                    src.alive();
                    continue;
                }
                ev = ev_rx.recv() => if ev.is_none() { return Ok(()) },
                () = async {
                    if unsettled {
                        tokio::time::sleep(UNSETTLED_RETRY).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                } => {}
            }
            // An editor's save is several events; one rescan covers them.
            tokio::time::sleep(Duration::from_millis(1)).await;
            while ev_rx.try_recv().is_ok() {}
            let now = folder_id(&dir);
            if now != watched && now.is_some() {
                let _ = watcher.unwatch(&dir);
                match watcher.watch(&dir, notify::RecursiveMode::Recursive) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "manifests folder created again: watched");
                        watched = now;
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "watching the manifests folder again");
                    }
                }
            }
            let (back, result) = src.rescan_off_runtime().await;
            src = back;
            src.alive();
            match result {
                Ok((mut input, again)) => {
                    unsettled = again;
                    // A rescan builds every map anew: what did not change
                    // is taken from the last version, so the loop's
                    // change set costs the changes, not the folder.
                    input.snapshot = std::mem::take(&mut input.snapshot).rebased_on(&last.snapshot);
                    if input.snapshot != last.snapshot || input.problems != last.problems {
                        publish(&tx, &input, &dir);
                        last = input;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifests folder unreadable, keeping the last state");
                }
            }
        }
    }
}

/// The folder's identity (device, inode), to tell when it was replaced.
fn folder_id(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

fn publish(tx: &InputSender, input: &Input, dir: &Path) {
    for p in &input.problems {
        tracing::warn!(dir = %dir.display(), problem = %p, "manifest problem");
    }
    tracing::debug!(
        dir = %dir.display(),
        pods = input.snapshot.pods.len(),
        policies = input.snapshot.policies.len(),
        services = input.snapshot.services.len(),
        "manifests read"
    );
    tx.send_replace(Some(Arc::new(input.clone())));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectRef;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("netpol-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).expect("write");
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const POLICY_80: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}
";

    #[test]
    fn removed_objects_and_files_leave_the_model() {
        let d = Dir::new("remove");
        d.write(
            "a.yaml",
            "{apiVersion: v1, kind: Namespace, metadata: {name: x}}\n---\n\
             {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x}, status: {podIP: 10.0.0.1}}",
        );
        d.write("b.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        let input = src.rescan().expect("rescan");
        assert_eq!(input.snapshot.pods.len(), 1);
        assert_eq!(input.snapshot.policies.len(), 1);
        d.write(
            "a.yaml",
            "{apiVersion: v1, kind: Namespace, metadata: {name: x}}",
        );
        std::fs::remove_file(d.0.join("b.yaml")).expect("rm");
        let input = src.rescan().expect("rescan");
        assert!(input.snapshot.pods.is_empty());
        assert!(input.snapshot.policies.is_empty());
        assert!(input.snapshot.namespaces.contains_key("x"));
    }

    #[test]
    fn broken_file_is_named_and_its_last_contents_stay() {
        let d = Dir::new("broken");
        d.write("p.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        assert!(src.rescan().expect("rescan").problems.is_empty());
        d.write("p.yaml", "kind: [unclosed\n");
        let input = src.rescan().expect("rescan");
        assert_eq!(input.problems.len(), 1, "{:?}", input.problems);
        assert!(input.problems[0].contains("p.yaml"), "{:?}", input.problems);
        assert!(
            input
                .snapshot
                .policies
                .contains_key(&ObjectRef::new("x", "p"))
        );
    }

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 10.43.0.1, ports: [{port: 80}]}
";

    #[test]
    fn services_load_keep_their_last_valid_version_and_leave_with_their_file() {
        let d = Dir::new("service");
        d.write("s.yaml", SERVICE);
        let mut src = FilesSource::new(&d.0);
        let id = ObjectRef::new("x", "s");
        let input = src.rescan().expect("rescan");
        let valid = input.snapshot.services[&id].clone();
        assert_eq!(
            valid.cluster_ips,
            vec!["10.43.0.1".parse::<std::net::IpAddr>().expect("ip")]
        );
        d.write("s.yaml", &SERVICE.replace("port: 80", "port: 0"));
        let input = src.rescan().expect("rescan");
        assert_eq!(input.snapshot.services[&id], valid);
        assert!(
            input
                .problems
                .iter()
                .any(|p| p.contains("s.yaml") && p.contains("spec.ports[0].port")),
            "{:?}",
            input.problems
        );
        std::fs::remove_file(d.0.join("s.yaml")).expect("rm");
        let input = src.rescan().expect("rescan");
        assert!(input.snapshot.services.is_empty());
        assert!(input.problems.is_empty(), "{:?}", input.problems);
    }

    #[test]
    fn invalid_policy_keeps_its_last_valid_version() {
        let d = Dir::new("invalid");
        d.write("p.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        let before = src.rescan().expect("rescan").snapshot.policies[&ObjectRef::new("x", "p")]
            .in_force
            .clone();
        d.write(
            "p.yaml",
            &POLICY_80.replace("port: 80", "port: 80, protocol: ICMP"),
        );
        let input = src.rescan().expect("rescan");
        let slot = &input.snapshot.policies[&ObjectRef::new("x", "p")];
        assert_eq!(slot.in_force, before);
        assert!(!slot.errors.is_empty());
        assert!(
            input
                .problems
                .iter()
                .any(|p| p.contains("p.yaml") && p.contains("ICMP")),
            "{:?}",
            input.problems
        );
    }

    fn policy_ports(input: &Input, name: &str) -> Option<String> {
        input
            .snapshot
            .policies
            .get(&ObjectRef::new("x", name))
            .and_then(|slot| slot.in_force.as_ref())
            .map(|p| format!("{:?}", p.ingress))
    }

    fn has_problem(input: &Input, parts: &[&str]) -> bool {
        input
            .problems
            .iter()
            .any(|p| parts.iter().all(|part| p.contains(part)))
    }

    #[test]
    fn an_edit_read_while_the_file_is_empty_waits_for_the_new_text() {
        let d = Dir::new("inplace");
        d.write("p.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        let before = policy_ports(&src.rescan().expect("rescan"), "p");
        assert!(before.is_some());
        // An editor truncates, then writes a moment later.
        let file = d.0.join("p.yaml");
        std::fs::write(&file, "").expect("truncate");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(&file, POLICY_80.replace("port: 80", "port: 81")).expect("write");
        });
        let input = src.rescan().expect("rescan");
        writer.join().expect("writer");
        let after = policy_ports(&input, "p").expect("never read as gone");
        assert!(after.contains("81"), "{after}");
        // An emptied file left alone does remove its objects.
        std::fs::write(d.0.join("p.yaml"), "").expect("truncate");
        let input = src.rescan().expect("rescan");
        assert_eq!(policy_ports(&input, "p"), None);
    }

    #[test]
    fn typos_that_would_widen_a_rule_are_refused_and_the_last_valid_version_stays() {
        let d = Dir::new("typos");
        d.write("p.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        let valid = policy_ports(&src.rescan().expect("rescan"), "p");
        let typos: &[(&str, &str, &str)] = &[
            (
                "ingress: [{ports",
                "ingress: [{form: [{podSelector: {}}], ports",
                "spec.ingress[0].form",
            ),
            (
                "ports: [{port: 80}]",
                "port: [{port: 80}]",
                "spec.ingress[0].port",
            ),
            (
                "podSelector: {}",
                "podSelector: {matchLabel: {app: a}}",
                "spec.podSelector.matchLabel",
            ),
            (
                "spec: {",
                "spec: {podSelector: {}, ",
                "duplicate key \"podSelector\"",
            ),
            (
                "kind: NetworkPolicy",
                "kind: NetworkPolicy\nkind: NetworkPolicy",
                "duplicate key \"kind\"",
            ),
            (
                "kind: NetworkPolicy",
                "kind: NetworkPolic",
                "NetworkPolic, not a kind netpol reads",
            ),
            (
                "networking.k8s.io/v1",
                "networking.k8s.io/v2",
                "networking.k8s.io/v2",
            ),
        ];
        for (from, to, why) in typos {
            d.write("p.yaml", &POLICY_80.replace(from, to));
            let input = src.rescan().expect("rescan");
            assert_eq!(policy_ports(&input, "p"), valid, "{to}");
            assert!(
                has_problem(&input, &["p.yaml", why]),
                "{to}: {:?}",
                input.problems
            );
            // A first version with the typo is no policy at all.
            let fresh = Folder::load(&d.0).expect("load");
            assert!(
                fresh
                    .snapshot
                    .policies
                    .get(&ObjectRef::new("x", "p"))
                    .and_then(|s| s.in_force.as_ref())
                    .is_none(),
                "{to}"
            );
        }
        // A JSON array of objects: the file is refused whole.
        d.write(
            "p.yaml",
            "[{\"apiVersion\": \"v1\", \"kind\": \"Namespace\"}]",
        );
        let input = src.rescan().expect("rescan");
        assert_eq!(policy_ports(&input, "p"), valid);
        assert!(
            has_problem(&input, &["p.yaml", "a list, not an object"]),
            "{:?}",
            input.problems
        );
        // Read again unchanged, the file's problem stays.
        let again = src.rescan().expect("rescan");
        assert_eq!(again.problems, input.problems);
        // Fixed: the problems clear.
        d.write("p.yaml", POLICY_80);
        assert!(src.rescan().expect("rescan").problems.is_empty());
    }

    #[test]
    fn a_duplicate_across_files_names_both_and_compile_agrees_with_run() {
        let d = Dir::new("dup");
        d.write("a.yaml", POLICY_80);
        d.write("b.yaml", &POLICY_80.replace("port: 80", "port: 0"));
        let mut src = FilesSource::new(&d.0);
        let input = src.rescan().expect("rescan");
        let kept = policy_ports(&input, "p").expect("the first file's version");
        assert!(kept.contains("80"), "{kept}");
        assert!(
            has_problem(&input, &["x/p", "a.yaml", "b.yaml", "the first is used"]),
            "{:?}",
            input.problems
        );
        let loaded = Folder::load(&d.0).expect("load");
        assert_eq!(loaded.snapshot, input.snapshot);
    }

    #[test]
    fn non_regular_files_links_in_a_loop_and_a_byte_order_mark() {
        let d = Dir::new("special");
        let fifo = d.0.join("fifo.yaml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink(&d.0, d.0.join("loop")).expect("symlink");
        d.write("p.yaml", &format!("\u{feff}{POLICY_80}"));
        let mut src = FilesSource::new(&d.0);
        let input = src.rescan().expect("rescan");
        assert!(policy_ports(&input, "p").is_some(), "{:?}", input.problems);
        assert!(
            has_problem(&input, &["fifo.yaml", "a FIFO"]),
            "{:?}",
            input.problems
        );
        // The FIFO replaced by a file: its problem clears.
        std::fs::remove_file(&fifo).expect("rm");
        d.write("fifo.yaml", "");
        std::thread::sleep(EMPTY_QUIET_FOR_TESTS);
        let input = src.rescan().expect("rescan");
        assert!(input.problems.is_empty(), "{:?}", input.problems);
    }

    const EMPTY_QUIET_FOR_TESTS: Duration = crate::model::folder::EMPTY_QUIET;

    #[tokio::test]
    async fn a_folder_deleted_and_created_again_is_watched_again() {
        let d = Dir::new("recreate");
        d.write("p.yaml", POLICY_80);
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(FilesSource::new(&d.0).run(tx, stop_rx));
        let until = |rx: &mut tokio::sync::watch::Receiver<Option<Arc<Input>>>,
                     want: fn(&Input) -> bool| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(20), async {
                    loop {
                        if rx.borrow_and_update().as_deref().is_some_and(want) {
                            return;
                        }
                        rx.changed().await.expect("source alive");
                    }
                })
                .await
                .expect("in time");
            }
        };
        until(&mut rx, |i| policy_ports(i, "p").is_some()).await;
        std::fs::remove_dir_all(&d.0).expect("rm folder");
        std::fs::create_dir_all(&d.0).expect("mkdir");
        d.write("q.yaml", &POLICY_80.replace("name: p", "name: q"));
        until(&mut rx, |i| policy_ports(i, "q").is_some()).await;
        stop_tx.send_replace(true);
        run.await.expect("join").expect("ran");
    }
}
