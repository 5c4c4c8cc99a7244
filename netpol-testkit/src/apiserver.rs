//! The test API server as its own process (`netpol-apiserver`): the
//! [`crate::fake_apiserver`] over TLS, with a bearer token, and its
//! credentials laid out as the kubelet mounts a service account.
//!
//! `--tls-dir DIR` holds:
//! - `ca.crt`, `ca.key`: a CA of its own;
//! - `server.crt`, `server.key`: the serving certificate, signed by it, for
//!   the listen address and the names a client may use;
//! - `serviceaccount/`: `token`, `ca.crt`, `namespace`, what a pod sees at
//!   /var/run/secrets/kubernetes.io/serviceaccount (bind-mount it there);
//! - `kubeconfig`: the same credentials for a client outside a pod.
//!
//! A restarted server finds them and serves with them again, so clients
//! already configured keep trusting it.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

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
        let pem = |path: &Path, e: rustls::pki_types::pem::Error| CredentialsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
            .map_err(|e| pem(&crt, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem(&crt, e))?;
        let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| pem(&key, e))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}
