//! Commands, names unique to the process, network namespaces, and whether
//! privileged tests may run.
use std::{
    fmt,
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// A command that could not start or failed, with what it printed.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether privileged tests may run. Without root they fail loudly, unless
/// `NETPOL_SKIP_PRIVILEGED=1` asks to skip them (CI never sets it).
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("NETPOL_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("skipping privileged test: not root and NETPOL_SKIP_PRIVILEGED=1");
        return false;
    }
    panic!(
        "this test needs root (BPF, network namespaces); run as root or set \
         NETPOL_SKIP_PRIVILEGED=1 to skip it"
    );
}

/// A short name unique to this process and call, fit for an interface name
/// (at most 15 bytes with the prefix).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command; its output, or an error naming it with what it printed.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error(format!("starting {program}: {e}")))?;
    if !out.status.success() {
        return Err(Error(format!(
            "`{program} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`], panicking when the command fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Moves the calling thread into the network namespace at `path`.
pub fn setns(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error(format!("opening {}: {e}", path.display())))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error(format!("entering {}: {e}", path.display())))
}

/// A network namespace with its loopback up, deleted on drop (also when
/// the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace named `prefix` and a [`unique`] suffix.
    pub fn new(prefix: &str) -> Self {
        Self::create(unique(prefix)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The namespace `name` (which must not exist yet).
    pub fn create(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        run("ip", &["netns", "add", &name])?;
        // Deleted again if the rest fails.
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on the existing namespace `name` that leaves it in place
    /// when dropped (one made by another process, or one that must outlive
    /// this one).
    pub fn existing(name: impl Into<String>) -> std::mem::ManuallyDrop<Self> {
        std::mem::ManuallyDrop::new(Self { name: name.into() })
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Self::path_of(&self.name)
    }

    /// Where `ip netns` keeps the namespace `name`.
    pub fn path_of(name: &str) -> PathBuf {
        PathBuf::from("/var/run/netns").join(name)
    }

    /// An open handle on the namespace, for `setns`.
    pub fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).map_err(|e| Error(format!("opening {}: {e}", path.display())))
    }

    /// Runs `program args` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Moves the calling thread into the namespace for good (benches, whose
    /// harness cannot move to another thread).
    pub fn enter(&self) {
        setns(&self.path()).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `f` on a thread of its own that enters the namespace, and
    /// leaves it running (traffic kept up while the test does other
    /// things).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            setns(&path).unwrap_or_else(|e| panic!("{e}"));
            f()
        })
    }

    /// Runs `f` on a thread that has entered the namespace. Everything the
    /// closure creates (sockets, netlink requests, BPF attachments by
    /// interface name) happens in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&path).unwrap_or_else(|e| panic!("{e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
