//! A folder of manifests read file by file: what `run --manifests`
//! watches (`sources::files`) and what `compile` and `fingerprint` read,
//! through the same code, so they agree.
//!
//! Each file is converted on its own into a fragment of the model, and
//! the snapshot is the union of the fragments. A file is converted again
//! only when its text changed, and its new fragment starts from its
//! previous one, per object `(kind, namespace, name)`:
//! - an object whose new version is invalid, unknown fields or repeated
//!   keys included, keeps its last valid version (the model's own
//!   retention) while its errors are reported;
//! - an object whose document now reads as a kind or apiVersion netpol
//!   does not read (a `kind:` typo) keeps its last valid version too;
//! - an object no document of the file names any more leaves the model;
//! - a file that cannot be read whole (not YAML, a list where an object
//!   belongs, too deep, unreadable, not a regular file, still being
//!   written) is reported by name and skipped: its previous fragment
//!   stays in force;
//! - an object defined in two files is an error naming both: the first
//!   file's (in path order) is used.
//!
//! Reads are consistent: a text is taken once the file has been quiet for
//! [`QUIET`] ([`EMPTY_QUIET`] for an empty one, as an editor truncates
//! before it writes), re-read until it is.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use super::{
    ModelError, ObjectRef, Snapshot,
    manifests::{KINDS, LoadReport, apply_value, documents},
    retain,
};

/// How long a changed file must have been left alone before it is read.
pub const QUIET: Duration = Duration::from_millis(20);
/// The same for a file that reads empty.
pub const EMPTY_QUIET: Duration = Duration::from_secs(1);
/// How long a rescan waits for changing files before it reports them.
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
/// The largest manifest file read: the API server's request limit.
pub const MAX_FILE_BYTES: u64 = 3 << 20;

/// The folder itself cannot be listed.
#[derive(Debug, thiserror::Error)]
#[error("reading manifests folder {path}: {source}")]
pub struct FolderError {
    /// The folder.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// What a folder holds after a [`Folder::rescan`].
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The union of the files' objects.
    pub snapshot: Snapshot,
    /// Every file, document and object problem, each naming its file.
    pub problems: Vec<ModelError>,
    /// Skipped kinds, one line each.
    pub notes: Vec<String>,
    /// Valid objects read.
    pub valid: usize,
    /// A file was still changing when the rescan gave up waiting: rescan
    /// again shortly.
    pub unsettled: bool,
}

#[derive(Debug, Default)]
struct FileState {
    /// Whether `text` was read and converted.
    read: bool,
    text: String,
    fragment: Snapshot,
    problems: Vec<ModelError>,
    notes: Vec<String>,
    valid: usize,
    /// Why the latest read failed; cleared by a read that succeeds.
    read_problem: Option<ModelError>,
}

/// A manifests folder and its files' fragments.
#[derive(Debug)]
pub struct Folder {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// One read of a file.
enum Read {
    Text(String, Stamp),
    Gone,
    Problem(String),
}

/// What tells two reads of a file apart without comparing their text.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

fn file_problem(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError {
        kind: "file".to_owned(),
        object: path.display().to_string(),
        field: String::new(),
        message: message.into(),
    }
}

/// Reads `path` once, without blocking on what is not a regular file.
fn read_once(path: &Path) -> Read {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Gone,
        Err(e) => return Read::Problem(format!("unreadable, skipped: {e}")),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Read::Problem(format!("unreadable, skipped: {e}")),
    };
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a file"
        };
        return Read::Problem(format!("not a regular file ({what}), skipped"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Read::Problem(format!(
            "{} bytes, more than the {MAX_FILE_BYTES} read, skipped",
            meta.len()
        ));
    }
    let mut text = String::new();
    if let Err(e) = (&file).take(MAX_FILE_BYTES + 1).read_to_string(&mut text) {
        return Read::Problem(format!("unreadable, skipped: {e}"));
    }
    Read::Text(text, Stamp::of(&meta))
}

/// Whether a text read with `stamp` may be taken: the file has been left
/// alone long enough, by its modification time.
fn quiet(text: &str, stamp: Stamp) -> bool {
    let need = if text.is_empty() { EMPTY_QUIET } else { QUIET };
    let mtime = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(stamp.mtime.0).unwrap_or(0),
            u32::try_from(stamp.mtime.1).unwrap_or(0),
        );
    SystemTime::now()
        .duration_since(mtime)
        .is_ok_and(|age| age >= need)
}

impl Folder {
    /// A folder; nothing is read until [`Self::rescan`].
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Reads it once: what `compile` and `fingerprint` see.
    ///
    /// # Errors
    /// When the folder cannot be listed.
    pub fn load(dir: &Path) -> Result<Loaded, FolderError> {
        Self::new(dir).rescan()
    }

    /// The folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the folder again, converting the files whose text changed
    /// (once they are quiet), and returns the union.
    ///
    /// # Errors
    /// When the folder itself cannot be listed; unreadable or broken files
    /// are problems of the returned [`Loaded`].
    pub fn rescan(&mut self) -> Result<Loaded, FolderError> {
        let paths = manifest_files(&self.dir).map_err(|source| FolderError {
            path: self.dir.clone(),
            source,
        })?;
        let present: BTreeSet<&PathBuf> = paths.iter().collect();
        self.files.retain(|p, _| present.contains(p));
        let mut waiting: Vec<(PathBuf, String, Stamp)> = Vec::new();
        for path in &paths {
            match read_once(path) {
                Read::Text(text, stamp) => {
                    let state = self.files.entry(path.clone()).or_default();
                    if state.read && state.text == text {
                        state.read_problem = None;
                    } else if quiet(&text, stamp) {
                        take(path, text, state);
                    } else {
                        waiting.push((path.clone(), text, stamp));
                    }
                }
                Read::Gone => {
                    self.files.remove(path);
                }
                Read::Problem(why) => self.unreadable(path, &why),
            }
        }
        let unsettled = self.settle(waiting);
        let mut loaded = self.merged();
        loaded.unsettled = unsettled;
        Ok(loaded)
    }

    /// Records why `path` could not be read; its last fragment stays.
    fn unreadable(&mut self, path: &Path, why: &str) {
        self.files.entry(path.to_owned()).or_default().read_problem = Some(file_problem(
            path,
            format!("{why}; its previous contents stay"),
        ));
    }

    /// Reads the changed files that were not quiet again until they are,
    /// for up to [`SETTLE_LIMIT`]; whether any is still changing.
    fn settle(&mut self, mut waiting: Vec<(PathBuf, String, Stamp)>) -> bool {
        let until = Instant::now() + SETTLE_LIMIT;
        while !waiting.is_empty() && Instant::now() < until {
            let longest = if waiting.iter().any(|(_, t, _)| t.is_empty()) {
                EMPTY_QUIET
            } else {
                QUIET
            };
            std::thread::sleep(longest);
            let mut still = Vec::new();
            for (path, text, stamp) in waiting {
                match read_once(&path) {
                    // Unchanged for a whole quiet period: taken.
                    Read::Text(again, s) if s == stamp && again == text => {
                        take(&path, text, self.files.entry(path.clone()).or_default());
                    }
                    Read::Text(again, s) => still.push((path, again, s)),
                    Read::Gone => {
                        self.files.remove(&path);
                    }
                    Read::Problem(why) => self.unreadable(&path, &why),
                }
            }
            waiting = still;
        }
        for (path, _, _) in &waiting {
            self.files.entry(path.clone()).or_default().read_problem = Some(file_problem(
                path,
                "still being written, read again shortly; its previous contents stay",
            ));
        }
        !waiting.is_empty()
    }

    /// The union of the fragments; an object two files define is taken
    /// from the first.
    fn merged(&self) -> Loaded {
        let mut out = Loaded::default();
        let mut owner: BTreeMap<(&'static str, ObjectRef), &Path> = BTreeMap::new();
        for (path, state) in &self.files {
            let f = &state.fragment;
            let mut dup = |kind: &'static str, id: ObjectRef, out: &mut Loaded| -> bool {
                if let Some(first) = owner.get(&(kind, id.clone())) {
                    out.problems.push(ModelError {
                        kind: kind.to_owned(),
                        object: id.to_string(),
                        field: String::new(),
                        message: format!(
                            "defined in both {} and {}: the first is used",
                            first.display(),
                            path.display()
                        ),
                    });
                    true
                } else {
                    owner.insert((kind, id), path);
                    false
                }
            };
            for (k, v) in &f.nodes {
                if !dup("Node", ObjectRef::new("", k.as_str()), &mut out) {
                    out.snapshot.nodes.insert(k.clone(), v.clone());
                }
            }
            for (k, v) in &f.namespaces {
                if !dup("Namespace", ObjectRef::new("", k.as_str()), &mut out) {
                    out.snapshot.namespaces.insert(k.clone(), v.clone());
                }
            }
            for (k, v) in &f.pods {
                if !dup("Pod", k.clone(), &mut out) {
                    out.snapshot.pods.insert(k.clone(), v.clone());
                }
            }
            for (k, v) in &f.policies {
                if !dup("NetworkPolicy", k.clone(), &mut out) {
                    out.snapshot.policies.insert(k.clone(), v.clone());
                }
            }
            for (k, v) in &f.services {
                if !dup("Service", k.clone(), &mut out) {
                    out.snapshot.services.insert(k.clone(), v.clone());
                }
            }
            for (k, v) in &f.cluster_policies {
                if !dup(
                    "ClusterNetworkPolicy",
                    ObjectRef::new("", k.as_str()),
                    &mut out,
                ) {
                    out.snapshot.cluster_policies.insert(k.clone(), v.clone());
                }
            }
            out.snapshot
                .invalid
                .extend(f.invalid.iter().map(|(k, v)| (k.clone(), v.clone())));
            out.problems.extend(state.read_problem.iter().cloned());
            out.problems.extend(state.problems.iter().cloned());
            out.notes.extend(state.notes.iter().cloned());
            out.valid += state.valid;
        }
        out
    }
}

/// Converts a file's new text, read whole and quiet.
fn take(path: &Path, text: String, state: &mut FileState) {
    state.read_problem = None;
    convert_file(path, &text, state);
    state.text = text;
    state.read = true;
}

/// Converts one file's new text into its fragment, starting from the
/// previous fragment so that rejected versions keep the last valid one.
fn convert_file(path: &Path, text: &str, state: &mut FileState) {
    let origin = path.display().to_string();
    let docs = match documents(text) {
        Ok(docs) => docs,
        Err((i, e)) => {
            tracing::warn!(file = %origin, document = i, error = %e, "broken manifest file skipped");
            // A problem of this text: it stays while the text does.
            state.problems = vec![file_problem(
                path,
                format!("document {i}: {e}; file skipped, its previous contents stay in force"),
            )];
            return;
        }
    };
    let mut fragment = std::mem::take(&mut state.fragment);
    // Errors are those of this version only.
    fragment.invalid.clear();
    let with_errors: Vec<ObjectRef> = fragment
        .policies
        .iter()
        .filter(|(_, slot)| !slot.errors.is_empty())
        .map(|(id, _)| id.clone())
        .collect();
    for id in with_errors {
        if let Some(slot) = fragment.policies.get_mut(&id) {
            slot.errors.clear();
        }
    }
    let with_errors: Vec<String> = fragment
        .cluster_policies
        .iter()
        .filter(|(_, slot)| !slot.errors.is_empty())
        .map(|(name, _)| name.clone())
        .collect();
    for name in with_errors {
        if let Some(slot) = fragment.cluster_policies.get_mut(&name) {
            slot.errors.clear();
        }
    }
    let mut named = Named::default();
    let mut report = LoadReport::default();
    for (i, value) in docs {
        named.add(&value, &format!("{origin}#{i}"));
        apply_value(&mut fragment, value, &format!("{origin}#{i}"), &mut report);
    }
    let mut kept = Vec::new();
    let mut keep = |kind: &str, ns: &str, name: &str| {
        if named.has(kind, ns, name) {
            return true;
        }
        let Some(doc) = named.as_unknown(ns, name) else {
            return false;
        };
        kept.push(ModelError {
            kind: kind.to_owned(),
            object: format!("{origin}: {}", ObjectRef::new(ns, name)),
            field: String::new(),
            message: format!(
                "{doc}, not a kind netpol reads; its last valid {kind} stays in force"
            ),
        });
        true
    };
    retain(&mut fragment.nodes, |n, _| keep("Node", "", n));
    retain(&mut fragment.namespaces, |n, _| keep("Namespace", "", n));
    retain(&mut fragment.pods, |id, _| {
        keep("Pod", &id.namespace, &id.name)
    });
    retain(&mut fragment.policies, |id, _| {
        keep("NetworkPolicy", &id.namespace, &id.name)
    });
    retain(&mut fragment.services, |id, _| {
        keep("Service", &id.namespace, &id.name)
    });
    retain(&mut fragment.cluster_policies, |n, _| {
        keep("ClusterNetworkPolicy", "", n)
    });
    let mut problems = report.errors;
    problems.extend(fragment.errors().into_iter().map(|e| ModelError {
        object: format!("{origin}: {}", e.object),
        ..e
    }));
    problems.extend(kept);
    for note in &report.notes {
        tracing::debug!(file = %origin, note, "manifest note");
    }
    state.fragment = fragment;
    state.problems = problems;
    state.notes = report.notes;
    state.valid = report.valid;
}

/// The objects a file's documents name, valid or not: an object still
/// named keeps its last valid version, one that is not is gone. Documents
/// of kinds netpol does not read are kept apart by name: such a document
/// in place of an object netpol read (a typo in its kind) keeps it.
#[derive(Default)]
struct Named {
    kinds: BTreeSet<(String, String, String)>,
    /// (namespace, name) → what the document says it is.
    unknown: BTreeMap<(String, String), String>,
}

impl Named {
    fn add(&mut self, value: &serde_json::Value, origin: &str) {
        let s = |v: Option<&serde_json::Value>| {
            v.and_then(|v| v.as_str()).unwrap_or_default().to_owned()
        };
        let api = s(value.get("apiVersion"));
        let kind = s(value.get("kind"));
        if let Some(items) = value.get("items").and_then(|v| v.as_array())
            && kind.ends_with("List")
        {
            for (i, item) in items.iter().enumerate() {
                self.add(item, &format!("{origin}.items[{i}]"));
            }
            return;
        }
        let meta = value.get("metadata");
        let name = s(meta.and_then(|m| m.get("name")));
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        if KINDS.contains(&(api.as_str(), kind.as_str())) {
            let namespace = match kind.as_str() {
                "Node" | "Namespace" | "ClusterNetworkPolicy" => String::new(),
                _ => namespace.unwrap_or_else(|| "default".to_owned()),
            };
            self.kinds.insert((kind, namespace, name));
        } else {
            let what = format!("{origin} reads as {api} {kind}");
            // Its scope is unknown: it may stand for a namespaced or a
            // cluster-wide object of that name.
            self.unknown.insert(
                (namespace.clone().unwrap_or_default(), name.clone()),
                what.clone(),
            );
            if namespace.is_none() {
                self.unknown.insert(("default".to_owned(), name), what);
            }
        }
    }

    fn has(&self, kind: &str, ns: &str, name: &str) -> bool {
        self.kinds
            .contains(&(kind.to_owned(), ns.to_owned(), name.to_owned()))
    }

    fn as_unknown(&self, ns: &str, name: &str) -> Option<&str> {
        self.unknown
            .get(&(ns.to_owned(), name.to_owned()))
            .map(String::as_str)
    }
}

/// The manifest files of `dir`: `.yaml`, `.yml` and `.json`, subfolders
/// (and links to them, each folder once) included, sorted by path;
/// hidden files (editors' and atomic writers' temporaries) left out.
///
/// # Errors
/// When a folder cannot be read.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    walk(dir, &mut seen, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(
    dir: &Path,
    seen: &mut BTreeSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    // A link back up the tree is walked once.
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, seen, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(path);
        }
    }
    Ok(())
}
