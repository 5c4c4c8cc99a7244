//! `cargo xtask image`: the agent's OCI image, built here with no base
//! image and nothing downloaded beyond what the bootstrap installs.
//!
//! One layer holds exactly:
//! - `/usr/bin/netpol-agent`, static (x86_64-unknown-linux-musl), built
//!   with the host's paths remapped;
//! - `/usr/lib/netpol/netpol-ebpf.o`, where the agent looks for it;
//! - `/usr/lib/netpol/netpol-cni`, the chained CNI plugin (static too),
//!   which the init container copies into the node's CNI folder;
//! - `/usr/sbin/bpftool`, Debian's, with the shared libraries and loader
//!   `ldd` lists, at their paths (it is not built static by Debian);
//! - the empty folders the DaemonSet mounts over (runc cannot create a
//!   mount point on a read-only root filesystem).
//!
//! No CA certificates: in a pod the client trusts the service account's
//! `ca.crt` and nothing else; only a kubeconfig without a CA would read the
//! system's roots, and the image runs in-cluster.
//!
//! The archive is an OCI image layout in a tar (`oci-archive`), named by
//! the `io.containerd.image.name` and `org.opencontainers.image.ref.name`
//! annotations, which `podman load`, `skopeo` and `k3s ctr images import`
//! read. Reproducible: entries sorted, owner 0, fixed modes, every time the
//! last commit's, an uncompressed layer; two builds of one commit in one
//! checkout give one digest.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::run;

/// The static target.
pub const MUSL: &str = "x86_64-unknown-linux-musl";
/// The image's name; the tag is the crate version.
pub const NAME: &str = crate::deploy::IMAGE;

/// Folders the DaemonSet (and the kubelet) mount over.
const MOUNT_POINTS: [&str; 9] = [
    "dev",
    "proc",
    "sys/fs/bpf",
    "run/netns",
    "run/netpol",
    "host/sys/fs/cgroup",
    "tmp",
    "var/run/secrets/kubernetes.io/serviceaccount",
    "etc",
];

/// What [`build`] made.
pub struct Built {
    /// The oci-archive.
    pub archive: PathBuf,
    /// `name:tag`.
    pub reference: String,
    /// The manifest's digest, `sha256:…`.
    pub digest: String,
}

/// Builds the binary, the object and the archive; prints
/// `image: sha256:<digest>` last.
pub fn build() -> Result<Built> {
    build_as(env!("CARGO_PKG_VERSION"))
}

/// [`build`], tagged and labelled `version` (the cluster's rolling
/// upgrade rolls to a second image of another version).
pub fn build_as(version: &str) -> Result<Built> {
    crate::bootstrap::image_tools()?;
    let object = crate::build_ebpf()?;
    let agent = static_agent()?;
    let reference = format!("{NAME}:{version}");
    let epoch = commit_time()?;
    let mut files: BTreeMap<String, Entry> = BTreeMap::new();
    for d in MOUNT_POINTS {
        add_dirs(&mut files, d);
    }
    add_file(&mut files, "usr/bin/netpol-agent", &agent, 0o755)?;
    add_file(&mut files, "usr/lib/netpol/netpol-ebpf.o", &object, 0o644)?;
    // The CNI plugin, which the init container copies onto the node.
    let cni = agent.with_file_name("netpol-cni");
    add_file(&mut files, "usr/lib/netpol/netpol-cni", &cni, 0o755)?;
    let bpftool = which("bpftool")?;
    add_file(&mut files, "usr/sbin/bpftool", &bpftool, 0o755)?;
    for lib in shared_libraries(&bpftool)? {
        let rel = lib.to_string_lossy().trim_start_matches('/').to_owned();
        let real =
            std::fs::canonicalize(&lib).with_context(|| format!("resolving {}", lib.display()))?;
        add_file(&mut files, &rel, &real, 0o755)?;
    }
    let revision = revision()?;
    let image = Meta {
        version,
        revision: &revision,
        epoch,
    };
    let (archive_bytes, digest) = archive(&files, &image)?;
    let dir = crate::root().join("target/image");
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join(format!("netpol-agent-{version}.oci.tar"));
    std::fs::write(&archive, &archive_bytes)
        .with_context(|| format!("writing {}", archive.display()))?;
    println!(
        "xtask: {} ({reference}, {:.1} MB)",
        archive.display(),
        archive_bytes.len() as f64 / 1e6
    );
    println!("image: {digest}");
    Ok(Built {
        archive,
        reference,
        digest,
    })
}

/// What the image says of itself besides its files.
struct Meta<'a> {
    /// The crate version: the tag and a label.
    version: &'a str,
    /// The commit: a label only, so that a build names its source.
    revision: &'a str,
    /// Every time in the archive, the layer's and the config's.
    epoch: u64,
}

/// The oci-archive of one layer holding `files`, and its manifest's
/// digest. A function of its inputs alone: no clock, no host name, no
/// owner, no order but the sorted one.
fn archive(files: &BTreeMap<String, Entry>, meta: &Meta<'_>) -> Result<(Vec<u8>, String)> {
    let Meta {
        version,
        revision,
        epoch,
    } = *meta;
    let reference = format!("{NAME}:{version}");
    let layer = tar(files, epoch)?;
    let layer_digest = sha256(&layer);
    let created = rfc3339(epoch);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Entrypoint": ["/usr/bin/netpol-agent"],
            "Cmd": ["run"],
            "Env": ["PATH=/usr/sbin:/usr/bin"],
            "Labels": {
                "org.opencontainers.image.title": "netpol-agent",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.revision": revision,
                "org.opencontainers.image.source": "https://github.com/netpol/netpol",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            // containerd's importer keeps a manifest with no platform on
            // every node; one for amd64 is refused on arm64 at import
            // rather than failing at exec.
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": reference,
            },
        }],
    }))?;
    let mut outer: BTreeMap<String, Entry> = BTreeMap::new();
    outer.insert(
        "oci-layout".into(),
        Entry::Bytes(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), 0o644),
    );
    outer.insert("index.json".into(), Entry::Bytes(index, 0o644));
    add_dirs(&mut outer, "blobs/sha256");
    for (d, bytes) in [
        (&layer_digest, layer),
        (&config_digest, config),
        (&digest, manifest),
    ] {
        let hex = d.trim_start_matches("sha256:");
        outer.insert(format!("blobs/sha256/{hex}"), Entry::Bytes(bytes, 0o644));
    }
    Ok((tar(&outer, epoch)?, digest))
}

/// The agent for the musl target, release, with this machine's paths
/// remapped ([`crate::remap_path_prefixes`]), so another checkout of the
/// commit builds the same bytes.
pub fn static_agent() -> Result<PathBuf> {
    println!("xtask: cargo build --release -p netpol-agent -p netpol-cni --target {MUSL} (static)");
    let root = crate::root();
    let mut flags = crate::remap_path_prefixes();
    flags.push("-Cstrip=debuginfo".to_owned());
    run(crate::cargo("stable")
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "netpol-agent",
            "-p",
            "netpol-cni",
            "--target",
            MUSL,
        ])
        .args(["--target-dir", "target"])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS",
            flags.join(" "),
        )
        // The binary looks for its object in the image's folder only.
        .env("NETPOL_NO_WORKSPACE_OBJECT", "1")
        // ring's C code, against musl's headers.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc"))?;
    let bin = root.join(format!("target/{MUSL}/release/netpol-agent"));
    let out = Command::new(&bin).arg("--version").output()?;
    ensure!(out.status.success(), "{} --version failed", bin.display());
    let ldd = Command::new("ldd").arg(&bin).output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    ensure!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "{} is not static: {said}",
        bin.display()
    );
    Ok(bin)
}

/// What `ldd` says `bin` loads, the loader included (the vDSO is not a
/// file).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    ensure!(out.status.success(), "ldd {}", bin.display());
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    ensure!(
        !libs.is_empty(),
        "ldd found no libraries for {}",
        bin.display()
    );
    libs.sort();
    libs.dedup();
    Ok(libs)
}

fn which(program: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{program} is not installed (cargo xtask bootstrap installs it)")
}

/// Seconds since the epoch of the last commit: every time in the image.
fn commit_time() -> Result<u64> {
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(crate::root())
        .output()
        .context("running git")?;
    ensure!(out.status.success(), "git log failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The commit, `-dirty` when the tree differs from it.
fn revision() -> Result<String> {
    let git = |args: &[&str]| -> Result<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(crate::root())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Ok(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// An entry of a tar: a folder, or a file's bytes and mode.
enum Entry {
    Dir,
    Bytes(Vec<u8>, u32),
}

/// `path`'s folders, each an entry.
fn add_dirs(files: &mut BTreeMap<String, Entry>, path: &str) {
    let mut at = String::new();
    for part in path.split('/') {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        files.entry(at.clone()).or_insert(Entry::Dir);
    }
}

fn add_file(files: &mut BTreeMap<String, Entry>, rel: &str, src: &Path, mode: u32) -> Result<()> {
    if let Some((dir, _)) = rel.rsplit_once('/') {
        add_dirs(files, dir);
    }
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    files.insert(rel.to_owned(), Entry::Bytes(bytes, mode));
    Ok(())
}

/// A ustar archive of `files` (in their sorted order), owner 0:0, every
/// time `mtime`.
fn tar(files: &BTreeMap<String, Entry>, mtime: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (path, entry) in files {
        let (name, mode, kind, data): (String, u32, u8, &[u8]) = match entry {
            Entry::Dir => (format!("{path}/"), 0o755, b'5', &[]),
            Entry::Bytes(b, mode) => (path.clone(), *mode, b'0', b),
        };
        ensure!(name.len() < 100, "{name}: too long for a ustar name");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], mtime);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field as spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    // Two zero blocks end the archive.
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

/// `v` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], v: u64) {
    let width = field.len() - 1;
    let text = format!("{v:0width$o}");
    field[..width].copy_from_slice(&text.as_bytes()[text.len() - width..]);
    field[width] = 0;
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `epoch` as RFC 3339 (UTC).
fn rfc3339(epoch: u64) -> String {
    let days = epoch / 86_400;
    let secs = epoch % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar archive's entries, in order, each checked to be owned by
    /// 0:0 and timed `mtime`.
    fn entries(tar: &[u8], mtime: u64) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while tar[at] != 0 {
            let h = &tar[at..at + 512];
            let name = String::from_utf8_lossy(&h[..100])
                .trim_end_matches('\0')
                .to_owned();
            assert_eq!(&h[108..115], b"0000000", "{name} uid");
            assert_eq!(&h[116..123], b"0000000", "{name} gid");
            assert_eq!(&h[136..147], format!("{mtime:011o}").as_bytes(), "{name}");
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&h[124..135]).trim_end_matches('\0'),
                8,
            )
            .unwrap();
            out.push((name, tar[at + 512..at + 512 + size].to_vec()));
            at += 512 + size.next_multiple_of(512);
        }
        out
    }

    fn names(entries: &[(String, Vec<u8>)]) -> Vec<&str> {
        entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn tar_is_deterministic_sorted_and_owned_by_root() {
        let mut files = BTreeMap::new();
        add_file(&mut files, "usr/bin/x", Path::new("Cargo.toml"), 0o755).unwrap();
        add_dirs(&mut files, "run/netpol");
        let a = tar(&files, 1_700_000_000).unwrap();
        let b = tar(&files, 1_700_000_000).unwrap();
        assert_eq!(sha256(&a), sha256(&b));
        assert_ne!(sha256(&a), sha256(&tar(&files, 1).unwrap()));
        assert_eq!(
            names(&entries(&a, 1_700_000_000)),
            ["run/", "run/netpol/", "usr/", "usr/bin/", "usr/bin/x"]
        );
    }

    #[test]
    fn archive_is_a_function_of_its_inputs_and_names_the_image() {
        let mut files = BTreeMap::new();
        add_dirs(&mut files, "sys/fs/bpf");
        add_file(
            &mut files,
            "usr/bin/netpol-agent",
            Path::new("Cargo.toml"),
            0o755,
        )
        .unwrap();
        let meta = Meta {
            version: "1.2.3",
            revision: "abc",
            epoch: 1_700_000_000,
        };
        let (a, digest) = archive(&files, &meta).unwrap();
        let (b, again) = archive(&files, &meta).unwrap();
        assert_eq!(digest, again);
        assert_eq!(a, b, "the archive itself, not only the manifest");
        let other = Meta {
            revision: "abd",
            ..meta
        };
        assert_ne!(archive(&files, &other).unwrap().1, digest);

        // The layout: sorted, owned by root, timed at the epoch, each blob
        // named by its digest.
        let outer = entries(&a, 1_700_000_000);
        let mut sorted = names(&outer);
        sorted.sort_unstable();
        assert_eq!(names(&outer), sorted);
        assert_eq!(&names(&outer)[..2], ["blobs/", "blobs/sha256/"]);
        assert_eq!(&names(&outer)[5..], ["index.json", "oci-layout"]);
        let blob = |d: &str| {
            let name = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
            let (_, bytes) = outer.iter().find(|(n, _)| *n == name).unwrap();
            assert_eq!(sha256(bytes), d);
            bytes.clone()
        };
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        let (_, index) = outer.iter().find(|(n, _)| n == "index.json").unwrap();
        let index = json(index);
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], digest.as_str());
        // containerd's importer (`k3s ctr images import`) names an image by
        // the first, podman and skopeo by the second.
        let reference = format!("{NAME}:1.2.3");
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            reference.as_str()
        );
        assert_eq!(
            entry["annotations"]["org.opencontainers.image.ref.name"],
            reference.as_str()
        );

        let manifest = json(&blob(&digest));
        let config = json(&blob(manifest["config"]["digest"].as_str().unwrap()));
        assert_eq!(config["created"], "2023-11-14T22:13:20Z");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/netpol-agent");
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.revision"],
            "abc"
        );
        let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layer).as_str());
        assert_eq!(
            names(&entries(&layer, 1_700_000_000)),
            [
                "sys/",
                "sys/fs/",
                "sys/fs/bpf/",
                "usr/",
                "usr/bin/",
                "usr/bin/netpol-agent"
            ]
        );
    }

    #[test]
    fn tar_headers_pass_gnu_tar() {
        let mut files = BTreeMap::new();
        add_file(&mut files, "usr/bin/x", Path::new("Cargo.toml"), 0o755).unwrap();
        let bytes = tar(&files, 1_700_000_000).unwrap();
        let path = std::env::temp_dir().join(format!("xtask-tar-{}.tar", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("-rwxr-xr-x 0/0"), "{listing}");
        assert!(listing.contains("2023-11-14"), "{listing}");
    }

    #[test]
    fn rfc3339_of_known_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
