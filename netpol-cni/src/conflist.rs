//! Putting the plugin into a node's conflist, and taking it out, by editing
//! the text: the rest of the file keeps its bytes, so an uninstall leaves
//! the file exactly as the install found it, and installing twice changes
//! nothing.
//!
//! The plugin goes last in `plugins`: after the main plugin (whose result
//! names the pod's interfaces) and after `portmap`, so ADD returns once
//! the whole chain is done and DEL (run in reverse) tells the agent first.

use std::{
    ops::Range,
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::PLUGIN_TYPE;

/// Why a conflist could not be edited.
#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    /// Not JSON, or no top-level `plugins` array (a single-plugin `.conf`).
    #[error("{file}: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// Reading, writing or listing failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// To what.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No conflist in the folder.
    #[error("no *.conflist in {0} (is the node's CNI installed? netpol-cni only chains after it)")]
    NoConflist(String),
}

/// The plugin's entry: its type, the agent's socket, and how long ADD
/// waits for the agent.
#[must_use]
pub fn entry(socket: &str, timeout_ms: u64) -> Value {
    serde_json::json!({ "type": PLUGIN_TYPE, "socket": socket, "timeoutMs": timeout_ms })
}

/// `text` with `entry` as the last plugin; `None` when it is there
/// already. A netpol entry that differs (another socket) is replaced in
/// place.
///
/// # Errors
/// [`ConflistError::Invalid`], naming `file`.
pub fn install(file: &str, text: &str, entry: &Value) -> Result<Option<String>, ConflistError> {
    let plugins = Plugins::find(file, text)?;
    let compact = entry.to_string();
    if let Some(i) = plugins.ours() {
        let span = plugins.elements[i].clone();
        if plugins.values[i] == *entry {
            return Ok(None);
        }
        return Ok(Some(format!(
            "{}{compact}{}",
            &text[..span.start],
            &text[span.end..]
        )));
    }
    Ok(Some(match plugins.elements.last() {
        Some(last) => format!("{},{compact}{}", &text[..last.end], &text[last.end..]),
        None => format!(
            "{}{compact}{}",
            &text[..plugins.inside.start],
            &text[plugins.inside.start..]
        ),
    }))
}

/// `text` without the plugin's entry; `None` when it has none. Undoes
/// [`install`] byte for byte.
///
/// # Errors
/// [`ConflistError::Invalid`], naming `file`.
pub fn uninstall(file: &str, text: &str) -> Result<Option<String>, ConflistError> {
    let plugins = Plugins::find(file, text)?;
    let Some(i) = plugins.ours() else {
        return Ok(None);
    };
    let e = &plugins.elements;
    let cut = if i > 0 {
        e[i - 1].end..e[i].end
    } else if e.len() > 1 {
        e[0].start..e[1].start
    } else {
        e[0].clone()
    };
    Ok(Some(format!("{}{}", &text[..cut.start], &text[cut.end..])))
}

/// The conflist the runtime uses: the first `*.conflist` of `dir` by name
/// (libcni's order; containerd loads the first).
///
/// # Errors
/// [`ConflistError::Io`], [`ConflistError::NoConflist`].
pub fn find(dir: &Path) -> Result<PathBuf, ConflistError> {
    all(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoConflist(dir.display().to_string()))
}

/// Every `*.conflist` of `dir`, by name.
///
/// # Errors
/// [`ConflistError::Io`] when `dir` cannot be listed.
pub fn all(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ConflistError::Io {
            op: "listing",
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    names.sort();
    Ok(names)
}

/// What [`edit_file`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// The file was rewritten.
    Changed,
    /// It already said what was wanted.
    Unchanged,
}

/// Applies `edit` (e.g. [`install`]) to `path`, replacing the file
/// atomically (a sibling written, then renamed over it, mode kept): the
/// runtime, which watches the folder, never reads half a file. The sibling's
/// name does not end in `.conflist`, so the runtime ignores it.
///
/// # Errors
/// [`ConflistError`].
pub fn edit_file(
    path: &Path,
    edit: impl FnOnce(&str, &str) -> Result<Option<String>, ConflistError>,
) -> Result<Edit, ConflistError> {
    let name = path.display().to_string();
    let io = |op: &'static str| {
        let path = name.clone();
        move |source| ConflistError::Io { op, path, source }
    };
    let text = std::fs::read_to_string(path).map_err(io("reading"))?;
    let Some(new) = edit(&name, &text)? else {
        return Ok(Edit::Unchanged);
    };
    let perms = std::fs::metadata(path)
        .map_err(io("reading"))?
        .permissions();
    let tmp = path.with_extension("netpol-tmp");
    std::fs::write(&tmp, new).map_err(io("writing"))?;
    std::fs::set_permissions(&tmp, perms).map_err(io("writing"))?;
    std::fs::rename(&tmp, path).map_err(io("replacing"))?;
    Ok(Edit::Changed)
}

/// Copies the plugin binary to `bin_dir` (atomically, mode 0755); nothing
/// is written when the same bytes are there.
///
/// # Errors
/// [`ConflistError::Io`].
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<Edit, ConflistError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dst = bin_dir.join(PLUGIN_TYPE);
    let io = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ConflistError::Io { op, path, source }
    };
    let bytes = std::fs::read(src).map_err(io("reading", src))?;
    if std::fs::read(&dst).is_ok_and(|b| b == bytes) {
        return Ok(Edit::Unchanged);
    }
    std::fs::create_dir_all(bin_dir).map_err(io("creating", bin_dir))?;
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io("replacing", &dst))?;
    Ok(Edit::Changed)
}

/// The top-level `plugins` array of a conflist, located in its text.
struct Plugins {
    /// Between the brackets.
    inside: Range<usize>,
    /// Each element, without the whitespace around it.
    elements: Vec<Range<usize>>,
    /// Each element parsed.
    values: Vec<Value>,
}

impl Plugins {
    fn find(file: &str, text: &str) -> Result<Self, ConflistError> {
        let invalid = |reason: String| ConflistError::Invalid {
            file: file.to_owned(),
            reason,
        };
        let doc: Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
        if !doc.get("plugins").is_some_and(Value::is_array) {
            return Err(invalid(
                "no \"plugins\" array (a single-plugin .conf: netpol-cni chains only in a conflist)"
                    .into(),
            ));
        }
        let inside = plugins_array(text)
            .ok_or_else(|| invalid("\"plugins\" array not found in the text".into()))?;
        let elements = split_elements(text, inside.clone());
        let values = elements
            .iter()
            .map(|r| serde_json::from_str(&text[r.clone()]))
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| invalid(format!("a plugin entry: {e}")))?;
        Ok(Self {
            inside,
            elements,
            values,
        })
    }

    fn ours(&self) -> Option<usize> {
        self.values
            .iter()
            .position(|v| v.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
    }
}

/// Walks JSON text (known valid), calling `f(index, byte, depth)` for
/// every structural byte outside strings, with the depth before it.
fn walk(text: &str, range: Range<usize>, mut f: impl FnMut(usize, u8, usize) -> bool) {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for i in range {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        if !f(i, b, depth) {
            return;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
}

/// The range between the brackets of the top-level `"plugins": [ ... ]`.
fn plugins_array(text: &str) -> Option<Range<usize>> {
    let open = find_key(text)?;
    let mut close = None;
    walk(text, open..text.len(), |i, b, depth| {
        if b == b']' && depth == 1 {
            close = Some(i);
            return false;
        }
        true
    });
    Some(open + 1..close?)
}

/// The `[` of the top-level `plugins` value: a string opening at depth 1
/// that reads `"plugins"` (an escaped quote would differ), then `:`.
fn find_key(text: &str) -> Option<usize> {
    let mut found = None;
    walk(text, 0..text.len(), |i, b, depth| {
        if b != b'"' || depth != 1 {
            return true;
        }
        let Some(after) = text[i..].strip_prefix("\"plugins\"") else {
            return true;
        };
        let after = after.trim_start();
        if let Some(v) = after.strip_prefix(':').map(str::trim_start)
            && v.starts_with('[')
        {
            found = Some(text.len() - v.len());
            return false;
        }
        true
    });
    found
}

/// The elements of an array's inside, trimmed of whitespace.
fn split_elements(text: &str, inside: Range<usize>) -> Vec<Range<usize>> {
    let mut cuts = vec![inside.start];
    walk(text, inside.clone(), |i, b, depth| {
        if b == b',' && depth == 0 {
            cuts.push(i);
        }
        true
    });
    cuts.push(inside.end);
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let start = if w[0] == inside.start { w[0] } else { w[0] + 1 };
        let raw = &text[start..w[1]];
        let lead = raw.len() - raw.trim_start().len();
        let trimmed = raw.trim();
        if !trimmed.is_empty() {
            out.push(start + lead..start + lead + trimmed.len());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// k3s's flannel conflist, as k3s writes it.
    const K3S: &str = netpol_testkit::cni::K3S_FLANNEL_CONFLIST;

    fn ours() -> Value {
        entry("/run/netpol/cni.sock", 10_000)
    }

    fn types(text: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(text).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn install_appends_last_and_uninstall_restores_the_bytes() {
        let installed = install("f", K3S, &ours()).unwrap().unwrap();
        assert_eq!(
            types(&installed),
            ["flannel", "portmap", "bandwidth", "netpol-cni"]
        );
        let v: Value = serde_json::from_str(&installed).unwrap();
        assert_eq!(v["plugins"][3], ours());
        assert_eq!(v["name"], "cbr0", "the rest is kept");
        assert_eq!(uninstall("f", &installed).unwrap().unwrap(), K3S);
    }

    #[test]
    fn installing_twice_changes_nothing_and_uninstalling_an_absent_entry_too() {
        let once = install("f", K3S, &ours()).unwrap().unwrap();
        assert_eq!(install("f", &once, &ours()).unwrap(), None);
        assert_eq!(uninstall("f", K3S).unwrap(), None);
    }

    #[test]
    fn another_socket_replaces_the_entry_in_place() {
        let once = install("f", K3S, &ours()).unwrap().unwrap();
        let other = entry("/other.sock", 1);
        let twice = install("f", &once, &other).unwrap().unwrap();
        assert_eq!(
            types(&twice),
            ["flannel", "portmap", "bandwidth", "netpol-cni"]
        );
        let v: Value = serde_json::from_str(&twice).unwrap();
        assert_eq!(v["plugins"][3]["socket"], "/other.sock");
        assert_eq!(uninstall("f", &twice).unwrap().unwrap(), K3S);
    }

    #[test]
    fn an_entry_anywhere_in_the_list_is_removed_with_its_comma() {
        for text in [
            r#"{"plugins":[{"type":"netpol-cni"},{"type":"bridge"}]}"#,
            r#"{"plugins":[{"type":"bridge"}, {"type":"netpol-cni"} ,{"type":"portmap"}]}"#,
            r#"{"plugins":[ {"type":"netpol-cni"} ]}"#,
        ] {
            let out = uninstall("f", text).unwrap().unwrap();
            assert!(!types(&out).contains(&"netpol-cni".to_owned()), "{out}");
            serde_json::from_str::<Value>(&out).unwrap();
        }
    }

    #[test]
    fn an_empty_list_and_strings_with_brackets_are_handled() {
        let text = r#"{"name":"a]b\"plugins\":[","plugins":[]}"#;
        let out = install("f", text, &ours()).unwrap().unwrap();
        assert_eq!(types(&out), ["netpol-cni"]);
        assert_eq!(uninstall("f", &out).unwrap().unwrap(), text);
        // A nested "plugins" key is not the list.
        let nested = r#"{"x":{"plugins":[1]},"plugins":[{"type":"bridge"}]}"#;
        let out = install("f", nested, &ours()).unwrap().unwrap();
        assert_eq!(types(&out), ["bridge", "netpol-cni"]);
    }

    #[test]
    fn a_conf_without_plugins_or_not_json_is_refused_by_name() {
        let e = install("/etc/cni/net.d/10-x.conf", r#"{"type":"bridge"}"#, &ours()).unwrap_err();
        assert!(
            e.to_string().contains("10-x.conf") && e.to_string().contains("plugins"),
            "{e}"
        );
        let e = install("g", "{", &ours()).unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn files_are_replaced_whole_and_the_first_conflist_is_the_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20-b.conflist"), "{}").unwrap();
        std::fs::write(dir.path().join("10-flannel.conflist"), K3S).unwrap();
        std::fs::write(dir.path().join("05-x.conf"), "{}").unwrap();
        let f = find(dir.path()).unwrap();
        assert!(f.ends_with("10-flannel.conflist"));
        let e = ours();
        assert_eq!(
            edit_file(&f, |n, t| install(n, t, &e)).unwrap(),
            Edit::Changed
        );
        assert_eq!(
            edit_file(&f, |n, t| install(n, t, &e)).unwrap(),
            Edit::Unchanged
        );
        assert_eq!(edit_file(&f, uninstall).unwrap(), Edit::Changed);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), K3S);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 3, "no temporary file left");
        assert!(matches!(
            find(&dir.path().join("none")),
            Err(ConflistError::Io { .. })
        ));
    }

    #[test]
    fn the_binary_is_copied_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"plugin").unwrap();
        let bin = dir.path().join("bin");
        assert_eq!(install_binary(&src, &bin).unwrap(), Edit::Changed);
        assert_eq!(install_binary(&src, &bin).unwrap(), Edit::Unchanged);
        assert_eq!(std::fs::read(bin.join(PLUGIN_TYPE)).unwrap(), b"plugin");
    }
}
