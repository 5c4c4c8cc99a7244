//! The test API server as its own process (`netpol-apiserver`): the
//! [`crate::fake_apiserver`] over TLS, with a bearer token, and its
//! credentials laid out as the kubelet mounts a service account.
//!
//! `--tls-dir DIR` holds:
//! - `ca.crt`, `ca.key`: a CA of its own;
//! - `server.crt`, `server.key`: the serving certificate, signed by it, for
//!   the listen address and the names a client may use;
//! - `serviceaccount/`: `token`, `ca.crt`, `namespace`, what a pod sees at
//!   /var/run/secrets/kubernetes.io/serviceaccount (bind-mount it there;
//!   a folder of its own, so a container sees no private key);
//! - `kubeconfig`: the same credentials for a client outside a pod.
//!
//! A restarted server finds them and serves with them again, so clients
//! already configured keep trusting it.
//!
//! [`Process`] runs the binary for a test: the testkit's own tests name it
//! with `env!("CARGO_BIN_EXE_netpol-apiserver")`; other crates' tests and
//! xtask find it with [`binary`] once `cargo build -p netpol-testkit --bin
//! netpol-apiserver` (what xtask's `apiserver_binary()` runs) has put it at
//! `target/debug/netpol-apiserver`. [`create`] and [`delete`] write through
//! any client, as kubectl would.
use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::Value;

use crate::fake_apiserver::{collection_path, object_path};

/// Names the serving certificate always covers (in-cluster clients use
/// the first).
const NAMES: [&str; 3] = ["kubernetes.default.svc", "kubernetes.default", "localhost"];

/// Errors preparing the credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{url}: not a URL: {message}")]
    Url { url: String, message: String },
    #[error("a client for {url}: {source}")]
    Client { url: String, source: kube::Error },
}

/// The server's credentials in their folder.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub dir: PathBuf,
    pub token: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pem(path: &Path, e: &rustls::pki_types::pem::Error) -> CredentialsError {
    CredentialsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn write(path: &Path, text: &str) -> Result<(), CredentialsError> {
    std::fs::write(path, text).map_err(io(path))
}

impl Credentials {
    /// The service account folder (mount it at
    /// /var/run/secrets/kubernetes.io/serviceaccount).
    #[must_use]
    pub fn service_account(&self) -> PathBuf {
        self.dir.join("serviceaccount")
    }

    /// The kubeconfig for clients outside a pod.
    #[must_use]
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The credentials a server made in `dir`.
    ///
    /// # Errors
    /// When its token cannot be read.
    pub fn read(dir: &Path) -> Result<Self, CredentialsError> {
        let path = dir.join("serviceaccount/token");
        let token = std::fs::read_to_string(&path).map_err(io(&path))?;
        Ok(Self {
            dir: dir.to_owned(),
            token: token.trim().to_owned(),
        })
    }

    /// A client of the server at `url` configured from exactly what an
    /// in-cluster client reads (the service account's CA, token and
    /// namespace), as `kube::Config::incluster` would build it had it the
    /// folder at its fixed path. Call it in a Tokio runtime (the client
    /// spawns its buffer task).
    ///
    /// # Errors
    /// When the files cannot be read or the client not built.
    pub fn client(&self, url: &str) -> Result<kube::Client, CredentialsError> {
        let sa = self.service_account();
        let ca = sa.join("ca.crt");
        let roots: Vec<Vec<u8>> = CertificateDer::pem_file_iter(&ca)
            .map_err(|e| pem(&ca, &e))?
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| pem(&ca, &e))?;
        let ns_path = sa.join("namespace");
        let namespace = std::fs::read_to_string(&ns_path).map_err(io(&ns_path))?;
        let client_error = |source| CredentialsError::Client {
            url: url.to_owned(),
            source,
        };
        let mut config =
            kube::Config::new(url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
                CredentialsError::Url {
                    url: url.to_owned(),
                    message: e.to_string(),
                }
            })?);
        config.root_cert = Some(roots);
        config.default_namespace = namespace;
        config.auth_info.token = Some(self.token.clone().into());
        kube::Client::try_from(config).map_err(client_error)
    }

    /// The credentials in `dir`, made (a new CA, certificate and token)
    /// when any is missing; the certificate covers `listen`'s address,
    /// [`NAMES`] and `extra` names or addresses.
    ///
    /// # Errors
    /// When files cannot be read, written or generated.
    pub fn load_or_create(
        dir: &Path,
        listen: SocketAddr,
        extra: &[String],
    ) -> Result<Self, CredentialsError> {
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).map_err(io(&sa))?;
        let files = [
            "ca.crt",
            "ca.key",
            "server.crt",
            "server.key",
            "serviceaccount/token",
        ];
        if !files.iter().all(|f| dir.join(f).is_file()) {
            Self::create(dir, listen.ip(), extra)?;
        }
        let token_path = sa.join("token");
        let token = std::fs::read_to_string(&token_path)
            .map_err(io(&token_path))?
            .trim()
            .to_owned();
        write(&sa.join("namespace"), "default")?;
        let ca = std::fs::read_to_string(dir.join("ca.crt")).map_err(io(&dir.join("ca.crt")))?;
        write(&sa.join("ca.crt"), &ca)?;
        write(
            &dir.join("kubeconfig"),
            &format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: test, cluster: {{server: \"https://{listen}\", certificate-authority: \"{}\"}}}}]\n\
                 users: [{{name: sa, user: {{token: \"{token}\"}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: sa}}}}]\n\
                 current-context: test\n",
                dir.join("ca.crt").display()
            ),
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            token,
        })
    }

    fn create(dir: &Path, ip: IpAddr, extra: &[String]) -> Result<(), CredentialsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "netpol test API server CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut names: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
        names.extend(
            extra
                .iter()
                .filter(|e| e.parse::<IpAddr>().is_err())
                .cloned(),
        );
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let mut ips = vec![ip];
        ips.extend(extra.iter().filter_map(|e| e.parse::<IpAddr>().ok()));
        if !ip.is_loopback() {
            ips.push(IpAddr::from([127, 0, 0, 1]));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let mut token = [0u8; 24];
        let urandom = Path::new("/dev/urandom");
        std::io::Read::read_exact(
            &mut std::fs::File::open(urandom).map_err(io(urandom))?,
            &mut token,
        )
        .map_err(io(urandom))?;
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        write(&dir.join("ca.crt"), &ca_cert.pem())?;
        write(&dir.join("ca.key"), &ca_key.serialize_pem())?;
        write(&dir.join("server.crt"), &cert.pem())?;
        write(&dir.join("server.key"), &key.serialize_pem())?;
        write(&dir.join("serviceaccount/token"), &token)?;
        Ok(())
    }

    /// The rustls acceptor serving the certificate.
    ///
    /// # Errors
    /// When the files are not PEM or rustls refuses them.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, CredentialsError> {
        let crt = self.dir.join("server.crt");
        let key = self.dir.join("server.key");
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
            .map_err(|e| pem(&crt, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem(&crt, &e))?;
        let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| pem(&key, &e))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Creates `obj` (its `kind` and namespace say where) through `client`,
/// as `kubectl create` does: a POST to its collection. Returns the object
/// as stored (with its `resourceVersion` and `uid`).
///
/// # Errors
/// The server's answer (`AlreadyExists`, ...) or the transport's.
///
/// # Panics
/// When the fake does not serve the object's kind.
pub async fn create(client: &kube::Client, obj: Value) -> Result<Value, kube::Error> {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let req = hyper::Request::post(collection_path(kind, ns))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(obj.to_string().into_bytes())
        .map_err(kube::Error::HttpError)?;
    client.request(req).await
}

/// Deletes an object through `client`; returns it as it was.
///
/// # Errors
/// The server's answer (`NotFound`, ...) or the transport's.
///
/// # Panics
/// When the fake does not serve `kind`.
pub async fn delete(
    client: &kube::Client,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Value, kube::Error> {
    let req = hyper::Request::delete(object_path(kind, namespace, name))
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    client.request(req).await
}

/// The objects of a manifest file (YAML or JSON, documents; a `kind:
/// List`'s items), or of every `.yaml`, `.yml` and `.json` file of a
/// folder in name order, as `--manifests` preloads them.
///
/// # Errors
/// The first file that cannot be read or parsed, and why.
pub fn manifests(path: &Path) -> Result<Vec<Value>, String> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut objects = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let docs = netpol_agent::model::manifests::documents(&text)
            .map_err(|(i, e)| format!("{} document {i}: {e}", file.display()))?;
        for (_, doc) in docs {
            match doc.get("items") {
                Some(Value::Array(items)) => objects.extend(items.iter().cloned()),
                _ => objects.push(doc),
            }
        }
    }
    Ok(objects)
}

/// Errors running the binary.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{path}: {source} (build it: cargo build -p netpol-testkit --bin netpol-apiserver)")]
    Binary {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netpol-apiserver did not start: {0}")]
    Start(String),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// `netpol-apiserver`: `NETPOL_APISERVER_BIN` when set, else the one in
/// the running executable's profile folder (`target/<profile>/`; a test's
/// executable is in its `deps/`), where `cargo build -p netpol-testkit
/// --bin netpol-apiserver` puts it. Building it here would wait forever
/// on the build folder's lock a running `cargo test` holds.
///
/// # Errors
/// When it is not there.
pub fn binary() -> Result<PathBuf, ProcessError> {
    if let Some(p) = std::env::var_os("NETPOL_APISERVER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|source| ProcessError::Binary {
        path: "the running executable".into(),
        source,
    })?;
    let mut dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("netpol-apiserver");
    std::fs::metadata(&path).map_err(|source| ProcessError::Binary {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// `netpol-apiserver` run by a test: started on an address and a folder,
/// stopped with SIGTERM (on drop too) and started again on the same
/// address and folder, so clients configured once keep working.
#[derive(Debug)]
pub struct Process {
    binary: PathBuf,
    /// The address bound (a `:0` given to [`Self::start`] is resolved
    /// once, so a restart listens where clients point).
    addr: SocketAddr,
    credentials: Credentials,
    args: Vec<String>,
    child: Option<Child>,
}

impl Process {
    /// Starts `binary` on `listen` (port 0 picks one) with its credentials
    /// in `tls_dir`, passing `args` too (`--san X`, `--manifests PATH`),
    /// and waits until it serves.
    ///
    /// # Errors
    /// When it cannot be run or does not say it is listening.
    pub fn start(
        binary: &Path,
        listen: SocketAddr,
        tls_dir: &Path,
        args: &[&str],
    ) -> Result<Self, ProcessError> {
        let (child, addr) = Self::spawn(binary, listen, tls_dir, args)?;
        Ok(Self {
            binary: binary.to_owned(),
            addr,
            credentials: Credentials::read(tls_dir)?,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: Some(child),
        })
    }

    fn spawn(
        binary: &Path,
        listen: SocketAddr,
        tls_dir: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> Result<(Child, SocketAddr), ProcessError> {
        let mut child = Command::new(binary)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--tls-dir")
            .arg(tls_dir)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| ProcessError::Binary {
                path: binary.to_owned(),
                source,
            })?;
        // Its first line, once it accepts connections; none if it exits.
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let addr = line
            .trim()
            .strip_prefix("listening on https://")
            .and_then(|a| a.parse().ok());
        match (read, addr) {
            (Some(Ok(_)), Some(addr)) => Ok((child, addr)),
            _ => {
                let _ = child.kill();
                let status = child.wait();
                Err(ProcessError::Start(format!(
                    "it said {line:?} and exited: {status:?}"
                )))
            }
        }
    }

    /// `https://ADDR:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The address it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its credentials (the `--tls-dir` folder and the token).
    #[must_use]
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// A client with the service account's credentials (in a runtime).
    ///
    /// # Errors
    /// See [`Credentials::client`].
    pub fn client(&self) -> Result<kube::Client, CredentialsError> {
        self.credentials.client(&self.url())
    }

    /// [`create`] with a new client.
    ///
    /// # Errors
    /// The server's answer, or a client that cannot be built.
    pub async fn create(&self, obj: Value) -> Result<Value, kube::Error> {
        create(&self.client().map_err(into_kube)?, obj).await
    }

    /// [`delete`] with a new client.
    ///
    /// # Errors
    /// The server's answer, or a client that cannot be built.
    pub async fn delete(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, kube::Error> {
        delete(&self.client().map_err(into_kube)?, kind, namespace, name).await
    }

    /// Stops it with SIGTERM, as the kubelet stops a container, and waits
    /// for it to exit; its objects are gone, its credentials stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = child.wait();
        }
    }

    /// Starts it again (stopping it first if running) on the same address
    /// and folder: the same CA, certificate and token.
    ///
    /// # Errors
    /// When it does not start (the port taken meanwhile, ...).
    pub fn restart(&mut self) -> Result<(), ProcessError> {
        self.stop();
        let (child, _) = Self::spawn(&self.binary, self.addr, &self.credentials.dir, &self.args)?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

fn into_kube(e: CredentialsError) -> kube::Error {
    match e {
        CredentialsError::Client { source, .. } => source,
        other => kube::Error::Service(Box::new(other)),
    }
}
