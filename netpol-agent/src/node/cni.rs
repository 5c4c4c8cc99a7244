//! The CNI plugin's socket: each connection carries one request of the
//! plugin (`netpol_cni::protocol`), handed to the reconcile loop, whose
//! answer goes back on the same connection.
//!
//! The socket is the agent's alone (mode 0600, on the state hostPath): a
//! report binds a veth to a pod, so whoever may write one may move a pod
//! under another pod's policy.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use netpol_cni::protocol::{Reply, Request};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};

/// A request of the plugin and where its answer goes.
#[derive(Debug)]
pub struct CniCall {
    /// What the plugin asks.
    pub request: Request,
    /// Where the loop answers.
    pub reply: oneshot::Sender<Reply>,
    /// When the request was read off the socket: the agent's time on an
    /// ADD counts from here, the wait for the loop included.
    pub received: std::time::Instant,
}

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
#[error("CNI socket {path}: {op}: {source}")]
pub struct CniSocketError {
    /// The socket.
    pub path: PathBuf,
    /// What failed.
    pub op: &'static str,
    /// Why.
    pub source: std::io::Error,
}

/// A request line longer than this is refused (a real one is < 1 KiB).
const MAX_LINE: u64 = 64 * 1024;

/// Binds `path` (replacing a previous agent's socket file) for
/// [`serve`].
///
/// # Errors
/// [`CniSocketError`].
pub fn bind(path: &Path) -> Result<UnixListener, CniSocketError> {
    let err = |op| {
        let path = path.to_owned();
        move |source| CniSocketError { path, op, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("creating its folder"))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing the old socket")(e)),
    }
    let l = UnixListener::bind(path).map_err(err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("setting its mode"))?;
    Ok(l)
}

/// Accepts connections until `stop`, each served on a task of its own
/// (an ADD waits for the loop's apply; others must not wait behind it).
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::UnboundedSender<CniCall>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            () = crate::shutdown::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket: accept");
                    continue;
                }
            },
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, calls).await {
                tracing::debug!(error = %e, "CNI socket: connection");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    calls: mpsc::UnboundedSender<CniCall>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::AsyncReadExt::take(BufReader::new(read), MAX_LINE)
        .read_line(&mut line)
        .await?;
    let received = std::time::Instant::now();
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Reply::Error {
            message: format!("not a netpol-cni request ({e})"),
        },
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            if calls
                .send(CniCall {
                    request,
                    reply: tx,
                    received,
                })
                .is_err()
            {
                Reply::Error {
                    message: "the agent is stopping".into(),
                }
            } else {
                rx.await.unwrap_or_else(|_| Reply::Error {
                    message: "the agent stopped before answering".into(),
                })
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// Where netpol-cni is installed on the node, and what its entry says.
#[derive(Clone, Debug)]
pub struct CniInstall {
    /// The plugin binary to copy (in the image: `/usr/lib/netpol/netpol-cni`).
    pub plugin: PathBuf,
    /// The node's CNI binaries (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The node's CNI configurations (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The conflist to edit; `None`: the first `*.conflist` of `conf_dir`,
    /// the one the runtime loads.
    pub conflist: Option<PathBuf>,
    /// The entry's socket.
    pub socket: PathBuf,
    /// The entry's ADD timeout.
    pub timeout_ms: u64,
}

/// What [`CniInstall::ensure`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    /// The conflist edited.
    pub conflist: PathBuf,
    /// Whether the binary was written.
    pub binary: bool,
    /// Whether the entry was written.
    pub entry: bool,
}

impl CniInstall {
    fn conflist(&self) -> Result<PathBuf, netpol_cni::conflist::ConflistError> {
        match &self.conflist {
            Some(f) => Ok(f.clone()),
            None => netpol_cni::conflist::find(&self.conf_dir),
        }
    }

    /// Copies the binary and puts the entry last in the conflist, both
    /// only when they are not there already (idempotent).
    ///
    /// # Errors
    /// [`netpol_cni::conflist::ConflistError`], naming the file.
    pub fn ensure(&self) -> Result<Installed, netpol_cni::conflist::ConflistError> {
        use netpol_cni::conflist::{Edit, edit_file, entry, install, install_binary};
        // The binary first: an entry naming a plugin the runtime cannot
        // find fails every ADD of the node.
        let binary = install_binary(&self.plugin, &self.bin_dir)? == Edit::Changed;
        let conflist = self.conflist()?;
        let e = entry(&self.socket.display().to_string(), self.timeout_ms);
        let entry = edit_file(&conflist, |n, t| install(n, t, &e))? == Edit::Changed;
        Ok(Installed {
            conflist,
            binary,
            entry,
        })
    }

    /// Takes the entry out of every conflist of `conf_dir` (and the
    /// explicit one), then the binary; returns the files edited.
    ///
    /// # Errors
    /// [`netpol_cni::conflist::ConflistError`], naming the file.
    pub fn remove(
        conf_dir: &Path,
        conflist: Option<&Path>,
        bin_dir: &Path,
    ) -> Result<Vec<PathBuf>, netpol_cni::conflist::ConflistError> {
        use netpol_cni::conflist::{Edit, edit_file, uninstall};
        // A folder that cannot be listed holds no entry of ours to remove.
        let mut files = netpol_cni::conflist::all(conf_dir).unwrap_or_default();
        files.extend(conflist.map(Path::to_owned));
        files.sort();
        files.dedup();
        let mut edited = Vec::new();
        for f in files {
            if edit_file(&f, uninstall)? == Edit::Changed {
                edited.push(f);
            }
        }
        let bin = bin_dir.join(netpol_cni::PLUGIN_TYPE);
        match std::fs::remove_file(&bin) {
            Ok(()) => edited.push(bin),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(netpol_cni::conflist::ConflistError::Io {
                    op: "removing",
                    path: bin.display().to_string(),
                    source,
                });
            }
        }
        Ok(edited)
    }
}

/// How often the running agent checks that the plugin is still in the
/// conflist: k3s writes its flannel conflist anew at every start.
pub const KEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the plugin installed until `stop`, saying when it had to put it
/// back.
pub async fn keep_installed(install: CniInstall, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(KEEP_EVERY);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            () = crate::shutdown::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let i = install.clone();
        let r = tokio::task::spawn_blocking(move || i.ensure()).await;
        match r {
            Ok(Ok(done)) => {
                if last_error.take().is_some() || done.entry || done.binary {
                    tracing::info!(
                        conflist = %done.conflist.display(),
                        entry_written = done.entry,
                        binary_written = done.binary,
                        "netpol-cni installed (its entry is put back whenever the conflist is \
                         rewritten without it)"
                    );
                }
            }
            Ok(Err(e)) => {
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "installing netpol-cni; new pods are bound without it");
                    last_error = Some(e);
                }
            }
            Err(e) => tracing::warn!(error = %e, "installing netpol-cni"),
        }
    }
}
