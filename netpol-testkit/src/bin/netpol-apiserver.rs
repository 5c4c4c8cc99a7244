//! The project's test API server as its own process, over TLS:
//!
//! ```text
//! netpol-apiserver --listen ADDR:PORT --tls-dir DIR [--san NAME_OR_IP]...
//!                  [--manifests FILE_OR_DIR] [--ready-file PATH]
//! ```
//!
//! It serves discovery, get, list, watch, create (POST), replace (PUT),
//! JSON, merge and strategic merge patches (PATCH) and delete for Pods,
//! Namespaces, Nodes, Services, NetworkPolicies and EndpointSlices to
//! requests bearing the token in `DIR/serviceaccount/token` (kubectl's
//! `create`, `get`, `apply`, `replace`, `label`, `annotate`, `patch` and
//! `delete` work), starting with the objects of
//! `--manifests`, and prints `listening on https://ADDR:PORT` once it
//! accepts connections (and writes that line to `--ready-file`). See
//! `netpol_testkit::apiserver` for the files in DIR. SIGTERM stops it.
//! It validates nothing beyond JSON, runs no admission and keeps nothing
//! on disk but its credentials: a restart starts with no objects but the
//! manifests'. SIGUSR1 compacts its history, as etcd's compaction
//! does: open watches end with `410 Gone`, and so does a watch from an
//! older version, so clients list again.
use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use netpol_testkit::{
    apiserver::{Credentials, manifests},
    fake_apiserver::{FakeApiServer, serves},
};

const USAGE: &str = "usage: netpol-apiserver --listen ADDR:PORT --tls-dir DIR [--san NAME_OR_IP]... [--manifests FILE_OR_DIR] [--ready-file PATH]";

struct Args {
    listen: SocketAddr,
    tls_dir: PathBuf,
    sans: Vec<String>,
    manifests: Option<PathBuf>,
    ready_file: Option<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut listen = None;
    let mut tls_dir = None;
    let mut sans = Vec::new();
    let mut manifests = None;
    let mut ready_file = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--tls-dir" => tls_dir = Some(PathBuf::from(value("--tls-dir")?)),
            "--san" => sans.push(value("--san")?),
            "--manifests" => manifests = Some(PathBuf::from(value("--manifests")?)),
            "--ready-file" => ready_file = Some(PathBuf::from(value("--ready-file")?)),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        tls_dir: tls_dir.ok_or("--tls-dir is required")?,
        sans,
        manifests,
        ready_file,
    })
}

fn main() -> ExitCode {
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netpol-apiserver: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> Result<(), String> {
    let a = args()?;
    // Read before binding: a bad manifest fails the start, not a test later.
    let objects = match &a.manifests {
        Some(path) => manifests(path)?,
        None => Vec::new(),
    };
    if let Some(obj) = objects
        .iter()
        .find(|o| !serves(o["kind"].as_str().unwrap_or_default()))
    {
        return Err(format!(
            "--manifests: the server does not serve kind {} (of {})",
            obj["kind"], obj["metadata"]["name"]
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", a.listen))?;
        // Port 0 picks one: the kubeconfig names the one bound.
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let creds =
            Credentials::load_or_create(&a.tls_dir, bound, &a.sans).map_err(|e| e.to_string())?;
        let acceptor = creds.acceptor().map_err(|e| e.to_string())?;
        let server = FakeApiServer::serve(listener, Some(acceptor), Some(creds.token.clone()));
        server.apply_all(objects);
        let line = format!("listening on {}", server.url());
        if let Some(path) = &a.ready_file {
            // Renamed into place, so a poller never reads half a line.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{line}\n"))
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        println!("{line}");
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM handler: {e}"))?;
        let mut compact =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .map_err(|e| format!("SIGUSR1 handler: {e}"))?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = compact.recv() => {
                    server.expire_watches();
                    println!("history compacted: watches from older versions get 410 Gone");
                    let _ = std::io::stdout().flush();
                }
            }
        }
        drop(server);
        Ok(())
    })
}
