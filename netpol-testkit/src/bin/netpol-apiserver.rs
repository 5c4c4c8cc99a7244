//! The project's test API server as its own process, over TLS:
//!
//! ```text
//! netpol-apiserver --listen ADDR:PORT --tls-dir DIR [--san NAME_OR_IP]...
//! ```
//!
//! It serves list, watch, create (POST), replace (PUT) and delete for
//! Pods, Namespaces, Nodes, Services, NetworkPolicies and EndpointSlices to
//! requests bearing the token in `DIR/serviceaccount/token`, and prints
//! `listening on https://ADDR:PORT` once it accepts connections (see
//! `netpol_testkit::apiserver` for the files in DIR). SIGTERM stops it.
//! It validates nothing beyond JSON, runs no admission and keeps nothing
//! on disk but its credentials: a restart starts with no objects.
use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use netpol_testkit::{apiserver::Credentials, fake_apiserver::FakeApiServer};

struct Args {
    listen: SocketAddr,
    tls_dir: PathBuf,
    sans: Vec<String>,
}

fn args() -> Result<Args, String> {
    let mut listen = None;
    let mut tls_dir = None;
    let mut sans = Vec::new();
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
            "-h" | "--help" => {
                return Err(
                    "usage: netpol-apiserver --listen ADDR:PORT --tls-dir DIR [--san NAME_OR_IP]..."
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        tls_dir: tls_dir.ok_or("--tls-dir is required")?,
        sans,
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
        println!("listening on {}", server.url());
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM handler: {e}"))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        drop(server);
        Ok(())
    })
}
