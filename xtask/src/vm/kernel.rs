//! Debian kernels for the VM matrix: fetched with a private apt state,
//! reduced to what a boot needs (the ELF `vmlinux`, whose PVH entry qemu
//! boots directly, and the modules the datapath uses) and cached under
//! `target/vm/kernels/<series>`.
//!
//! The machine's own apt sources are only read, for the archive addresses:
//! the suites the matrix needs (bullseye-security for 5.10) go into a
//! private sources list, lists and cache, so nothing the host installs or
//! upgrades changes.
use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::run;

/// The suites the matrix takes kernels from: 6.1 and 6.12 from bookworm
/// (and its security updates), 5.10 from bullseye's security updates.
const SUITES: &[(&str, Archive)] = &[
    ("bookworm", Archive::Main),
    ("bookworm-security", Archive::Security),
    ("bullseye-security", Archive::Security),
];

/// Modules the datapath needs that Debian builds as modules, in load order.
/// None depends on another (checked at extraction).
pub const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];

/// One kernel series of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// Package name before the ABI number: `linux-image-5.10.0-`.
    prefix: &'static str,
    /// Package name after it: `-amd64`.
    suffix: &'static str,
}

/// Every series, oldest first: 5.10 and 6.1 attach through netlink clsact
/// filters, 6.12 through TCX (Debian has no 5.15 or 6.6).
pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

impl Series {
    /// The ABI (or patch) number of a package of this series, if it is one.
    fn abi(&self, package: &str) -> Option<u32> {
        let n = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        n.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| n.parse().ok())?
    }
}

/// A cached kernel, ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: Series,
    /// `uname -r` in the guest.
    pub release: String,
    /// The ELF image.
    pub vmlinux: PathBuf,
    /// [`MODULES`], uncompressed, in load order.
    pub modules: Vec<PathBuf>,
}

impl Kernel {
    /// `(major, minor)` of [`Self::release`].
    pub fn version(&self) -> (u32, u32) {
        let mut it = self
            .release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Archive {
    Main,
    Security,
}

/// The kernels of `series` from the cache, fetching those missing (one
/// `apt-get update` for all).
pub fn get(vm_dir: &Path, series: &[Series]) -> Result<Vec<Kernel>> {
    let mut apt = None;
    let mut out = Vec::new();
    for s in series {
        let dir = vm_dir.join("kernels").join(s.name);
        if let Some(k) = cached(&dir, *s) {
            println!(
                "vm-test: kernel {} ({}): cached in {}",
                s.name,
                k.release,
                dir.display()
            );
            out.push(k);
            continue;
        }
        if apt.is_none() {
            let a = Apt::new(&vm_dir.join("apt"))?;
            a.update()?;
            apt = Some(a);
        }
        out.push(fetch(vm_dir, apt.as_ref().context("apt")?, *s, &dir)?);
    }
    Ok(out)
}

fn fetch(vm_dir: &Path, apt: &Apt, series: Series, dir: &Path) -> Result<Kernel> {
    let package = apt.newest(series)?;
    println!("vm-test: kernel {}: fetching {package}", series.name);
    let debs = vm_dir.join("debs");
    let deb = apt.download(&package, &debs)?;
    let staging = vm_dir.join("kernels").join(format!("{}.new", series.name));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("modules"))
        .with_context(|| format!("creating {}", staging.display()))?;
    let result = extract(&deb, &staging);
    // The package is large and everything needed is now in the cache.
    let _ = std::fs::remove_file(&deb);
    result?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir)
        .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    cached(dir, series).with_context(|| format!("{} incomplete after extraction", dir.display()))
}

fn cached(dir: &Path, series: Series) -> Option<Kernel> {
    let release = std::fs::read_to_string(dir.join("release")).ok()?;
    let vmlinux = dir.join("vmlinux");
    let modules: Vec<PathBuf> = MODULES
        .iter()
        .map(|m| dir.join("modules").join(format!("{m}.ko")))
        .collect();
    (vmlinux.is_file() && modules.iter().all(|m| m.is_file())).then(|| Kernel {
        series,
        release: release.trim().to_owned(),
        vmlinux,
        modules,
    })
}

/// apt with its own sources, lists and cache under `dir`.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self> {
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = private_sources(&host_sources()?)?;
        std::fs::write(dir.join("sources.list.d/netpol-vm.sources"), sources)
            .context("writing the private apt sources")?;
        std::fs::write(dir.join("sources.list"), "").context("writing the private apt sources")?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut c = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("sources.list.d")),
            ("Dir::Etc::Preferences", d("preferences")),
            ("Dir::Etc::PreferencesParts", d("preferences.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            // The private folders belong to root, not to apt's sandbox user.
            ("APT::Sandbox::User", "root".to_owned()),
            ("Acquire::Languages", "none".to_owned()),
        ] {
            c.arg("-o").arg(format!("{key}={value}"));
        }
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn update(&self) -> Result<()> {
        println!(
            "vm-test: apt-get update (private state in {})",
            self.dir.display()
        );
        run(self.command("apt-get").args(["update", "-qq"]))
    }

    /// The newest package of `series` the sources offer.
    fn newest(&self, series: Series) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["pkgnames", series.prefix])
            .output()
            .context("running apt-cache")?;
        ensure!(
            out.status.success(),
            "apt-cache pkgnames failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|p| series.abi(p).map(|abi| (abi, p.to_owned())))
            .max()
            .map(|(_, p)| p)
            .with_context(|| {
                format!(
                    "no {}N{} package in {} ({})",
                    series.prefix,
                    series.suffix,
                    SUITES
                        .iter()
                        .map(|(s, _)| *s)
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.dir.display()
                )
            })
    }

    fn download(&self, package: &str, dest: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        run(self
            .command("apt-get")
            .args(["download", "-qq", package])
            .current_dir(dest))?;
        let prefix = format!("{package}_");
        std::fs::read_dir(dest)
            .with_context(|| format!("reading {}", dest.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .with_context(|| format!("apt-get download left no {package} in {}", dest.display()))
    }
}

/// One `deb` entry of the machine's apt sources.
#[derive(Debug, PartialEq, Eq)]
struct Source {
    uri: String,
    suites: Vec<String>,
    signed_by: Option<String>,
}

/// The `deb` entries of the machine's apt sources, both formats.
fn host_sources() -> Result<Vec<Source>> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        out.extend(parse_one_line(&text));
    }
    let mut parts: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    parts.sort();
    for p in parts {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        match p.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_one_line(&text)),
            Some("sources") => out.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    Ok(out)
}

fn parse_one_line(text: &str) -> Vec<Source> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let rest = line.strip_prefix("deb ")?.trim();
            let (options, rest) = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?,
                None => ("", rest),
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            let signed_by = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            Some(Source {
                uri,
                suites: vec![suite],
                signed_by,
            })
        })
        .collect()
}

fn parse_deb822(text: &str) -> Vec<Source> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
            };
            let enabled = field("Enabled").is_none_or(|v| v != "no");
            let types = field("Types")?;
            (enabled && types.split_whitespace().any(|t| t == "deb")).then_some(())?;
            Some(Source {
                uri: field("URIs")?.split_whitespace().next()?.to_owned(),
                suites: field("Suites")?
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                signed_by: field("Signed-By").filter(|s| !s.contains('\n') && !s.is_empty()),
            })
        })
        .collect()
}

/// The private sources: each suite of [`SUITES`] at the address the
/// machine uses for that archive (a `-security` suite for the security
/// archive, a plain codename for the main one).
fn private_sources(host: &[Source]) -> Result<String> {
    let find = |archive: Archive| {
        host.iter().find(|s| {
            s.suites.iter().any(|suite| match archive {
                Archive::Security => suite.ends_with("-security"),
                Archive::Main => !suite.contains('-') && !suite.contains('/'),
            })
        })
    };
    let mut out = String::new();
    for (suite, archive) in SUITES {
        let Some(src) = find(*archive) else {
            bail!(
                "the machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d) name \
                 no Debian {} archive to take {suite} from",
                match archive {
                    Archive::Main => "main",
                    Archive::Security => "security",
                }
            );
        };
        out.push_str(&format!(
            "Types: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n",
            src.uri
        ));
        if let Some(key) = &src.signed_by {
            out.push_str(&format!("Signed-By: {key}\n"));
        }
        out.push('\n');
    }
    Ok(out)
}

/// Takes the kernel image and [`MODULES`] out of a `linux-image` package
/// into `dest`: `vmlinux`, `release`, `modules/<name>.ko`.
fn extract(deb: &Path, dest: &Path) -> Result<()> {
    let tree = dest.join("tree");
    std::fs::create_dir_all(&tree)?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb")?;
    let mut tar = Command::new("tar");
    tar.arg("-x")
        .arg("-C")
        .arg(&tree)
        .args(["--wildcards", "./boot/vmlinuz-*"])
        .args(MODULES.iter().map(|m| format!("*/{m}.ko*")))
        .stdin(dpkg.stdout.take().context("dpkg-deb stdout")?);
    let tar_status = tar.status().context("starting tar")?;
    let dpkg_status = dpkg.wait().context("waiting for dpkg-deb")?;
    ensure!(
        dpkg_status.success() && tar_status.success(),
        "extracting {} failed (dpkg-deb {dpkg_status}, tar {tar_status})",
        deb.display()
    );

    let boot = tree.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", deb.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_owned();
    let image =
        std::fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let elf = vmlinux_from_bzimage(&image)
        .with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
    std::fs::write(dest.join("vmlinux"), elf)?;

    let modules_root = tree.join("lib/modules").join(&release);
    for m in MODULES {
        let found = find_file(
            &modules_root,
            &[
                format!("{m}.ko"),
                format!("{m}.ko.xz"),
                format!("{m}.ko.zst"),
            ],
        )
        .with_context(|| format!("{m}.ko is not in {} (built in?)", deb.display()))?;
        let bytes = read_module(&found)?;
        let depends = modinfo(&bytes, "depends").unwrap_or_default();
        ensure!(
            depends.is_empty(),
            "{m}.ko of {release} depends on {depends}: add it to vm::kernel::MODULES"
        );
        std::fs::write(dest.join("modules").join(format!("{m}.ko")), bytes)?;
    }
    std::fs::remove_dir_all(&tree)?;
    std::fs::write(dest.join("release"), format!("{release}\n"))?;
    Ok(())
}

fn find_file(dir: &Path, names: &[String]) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, names) {
                return Some(found);
            }
        } else if p
            .file_name()
            .is_some_and(|n| names.iter().any(|want| n == want.as_str()))
        {
            return Some(p);
        }
    }
    None
}

/// A module file, decompressed (6.12's are `.ko.xz`; the guest's busybox
/// `insmod` takes plain ELF).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        decompress("xz", &bytes)
    } else if name.ends_with(".zst") {
        decompress("zstd", &bytes)
    } else {
        Ok(bytes)
    }
}

/// A `key=value` of a module's `.modinfo` strings.
fn modinfo(ko: &[u8], key: &str) -> Option<String> {
    let needle = format!("{key}=");
    ko.split(|b| *b == 0).find_map(|s| {
        s.strip_prefix(needle.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// The ELF kernel inside a bzImage: the setup header (`HdrS`, boot
/// protocol ≥ 2.08) says where the compressed payload is and how long;
/// the payload ends with the uncompressed size (le32).
fn vmlinux_from_bzimage(image: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |at: usize| -> Result<u32> {
        let b = image.get(at..at + 4).context("bzImage header cut short")?;
        Ok(u32::from_le_bytes(b.try_into()?))
    };
    ensure!(image.get(0x202..0x206) == Some(b"HdrS"), "not a bzImage");
    let setup_sects = match image.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let offset = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let payload = image
        .get(offset..offset + len)
        .context("bzImage payload out of bounds")?;
    let (data, size) = payload.split_at(len.checked_sub(4).context("empty payload")?);
    let size = u32::from_le_bytes(size.try_into()?) as usize;
    let tool = if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else if data.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else {
        bail!(
            "unknown payload compression (magic {:02x?})",
            &data[..data.len().min(6)]
        );
    };
    let elf = decompress(tool, data)?;
    ensure!(
        elf.starts_with(b"\x7fELF") && elf.len() == size,
        "{tool} gave {} bytes, not the {size}-byte ELF the image announces",
        elf.len()
    );
    Ok(elf)
}

/// `tool -dc`, fed from memory.
fn decompress(tool: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let (written, out) = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(data));
        let mut out = Vec::new();
        let read = stdout.read_to_end(&mut out);
        (writer.join(), read.map(|_| out))
    });
    let out = out.with_context(|| format!("reading {tool}'s output"))?;
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    ensure!(
        status.success() && matches!(written, Ok(Ok(()))),
        "{tool} -dc failed ({status}): {}",
        err.trim()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_numbers_come_from_the_package_name_only() {
        let s = SERIES[2];
        assert_eq!(s.abi("linux-image-6.12.117+deb12-amd64"), Some(117));
        assert_eq!(s.abi("linux-image-6.12.117+deb12-amd64-unsigned"), None);
        assert_eq!(s.abi("linux-image-6.12.117+deb12-cloud-amd64"), None);
        assert_eq!(SERIES[0].abi("linux-image-5.10.0-46-amd64"), Some(46));
        assert_eq!(SERIES[0].abi("linux-image-5.10.0-46-rt-amd64"), None);
    }

    #[test]
    fn private_sources_take_the_hosts_addresses_for_each_archive() {
        let host = parse_deb822(
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /k.gpg\n\nTypes: deb\n\
             URIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n\
             Components: main\n",
        );
        let text = private_sources(&host).expect("sources");
        assert!(text.contains(
            "URIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\nSigned-By: /k.gpg\n"
        ));
        assert!(
            text.contains(
                "URIs: http://mirror.invalid/debian-security\nSuites: bullseye-security\n"
            )
        );
        let one_line =
            parse_one_line("deb [signed-by=/k.gpg] http://m.invalid/debian bookworm main # c\n");
        assert_eq!(one_line[0].uri, "http://m.invalid/debian");
        assert_eq!(one_line[0].signed_by.as_deref(), Some("/k.gpg"));
    }

    #[test]
    fn modinfo_reads_a_key_of_the_modinfo_strings() {
        let ko = b"\x7fELF\0license=GPL\0depends=\0name=veth\0";
        assert_eq!(modinfo(ko, "depends").as_deref(), Some(""));
        assert_eq!(modinfo(ko, "name").as_deref(), Some("veth"));
    }
}
