//! Which coordinator certificates a client accepts, and why a TLS connection failed.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::{provider, tls_config_err, Fingerprint};
use crate::{io_err, NodeError, Result};

/// The coordinator certificates a client accepts.
#[derive(Clone, Debug, Default)]
pub enum TlsTrust {
    /// Certificates from the public web CAs (Mozilla's root list, built into the
    /// binary: the same on every host, whatever its OS trusts).
    #[default]
    PublicRoots,
    /// Certificates issued by these CAs only (a private CA's PEM file).
    Ca {
        /// The PEM file, for messages.
        path: PathBuf,
        /// Its certificates.
        certs: Vec<CertificateDer<'static>>,
    },
    /// Exactly the certificate with this fingerprint, whatever its names, issuer or
    /// dates: how workers trust a self-signed coordinator.
    Pinned(Fingerprint),
}

impl TlsTrust {
    /// From a worker's flags: `--tls-fingerprint HEX` or `--tls-ca PEM` (not both), else
    /// the public roots.
    pub fn from_flags(fingerprint: Option<&str>, ca: Option<&Path>) -> Result<TlsTrust> {
        match (fingerprint, ca) {
            (Some(_), Some(_)) => Err(NodeError::Config(
                "give --tls-fingerprint or --tls-ca, not both".into(),
            )),
            (Some(f), None) => Ok(TlsTrust::Pinned(f.parse()?)),
            (None, Some(p)) => TlsTrust::ca_file(p),
            (None, None) => Ok(TlsTrust::PublicRoots),
        }
    }

    /// Trust the CAs in a PEM file.
    pub fn ca_file(path: &Path) -> Result<TlsTrust> {
        let pem = std::fs::read(path).map_err(io_err(path))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(NodeError::Config(format!(
                "{}: no CERTIFICATE block in the PEM",
                path.display()
            )));
        }
        Ok(TlsTrust::Ca {
            path: path.to_path_buf(),
            certs,
        })
    }

    /// The public roots (the default).
    pub fn is_default(&self) -> bool {
        matches!(self, TlsTrust::PublicRoots)
    }

    /// In words, for reports.
    pub fn describe(&self) -> String {
        match self {
            TlsTrust::PublicRoots => "the public CA roots".into(),
            TlsTrust::Ca { path, .. } => format!("the CA in {}", path.display()),
            TlsTrust::Pinned(f) => format!("the pinned fingerprint {f}"),
        }
    }

    /// Sets up a reqwest client builder to trust what this says.
    pub fn configure(
        &self,
        b: reqwest::blocking::ClientBuilder,
    ) -> Result<reqwest::blocking::ClientBuilder> {
        let verifier: Arc<dyn ServerCertVerifier> = match self {
            // reqwest's own rustls set-up, with the webpki roots it is built with.
            TlsTrust::PublicRoots => return Ok(b),
            TlsTrust::Ca { certs, .. } => {
                WebPkiServerVerifier::builder_with_provider(Arc::new(store(certs)?), provider())
                    .build()
                    .map_err(|e| NodeError::Config(format!("--tls-ca: {e}")))?
            }
            TlsTrust::Pinned(f) => Arc::new(Pin {
                want: Some(*f),
                algs: provider().signature_verification_algorithms,
            }),
        };
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_config_err("TLS"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(b.use_preconfigured_tls(config))
    }

    /// Whether the certificate chain `chain` (leaf first) that `host` presented passes.
    pub fn check(
        &self,
        chain: &[CertificateDer<'static>],
        host: &str,
    ) -> std::result::Result<(), String> {
        let Some((leaf, rest)) = chain.split_first() else {
            return Err("no certificate presented".into());
        };
        let roots = match self {
            TlsTrust::Pinned(want) => {
                let got = Fingerprint::of(leaf);
                return if got == *want {
                    Ok(())
                } else {
                    Err(PinMismatch { got, want: *want }.to_string())
                };
            }
            TlsTrust::PublicRoots => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
            TlsTrust::Ca { certs, .. } => store(certs).map_err(|e| e.to_string())?,
        };
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| describe(&e))
    }
}

fn store(certs: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut s = RootCertStore::empty();
    for c in certs {
        s.add(c.clone())
            .map_err(|e| NodeError::Config(format!("--tls-ca: {e}")))?;
    }
    Ok(s)
}

/// A pinned fingerprint that the coordinator's certificate does not have.
#[derive(Debug, thiserror::Error)]
#[error(
    "the coordinator's certificate has SHA-256 fingerprint {got}, but {want} is pinned \
     (--tls-fingerprint): if its operator replaced the certificate, pin the new one; \
     otherwise something between you and the coordinator is impersonating it"
)]
pub struct PinMismatch {
    /// What the coordinator presented.
    pub got: Fingerprint,
    /// What was pinned.
    pub want: Fingerprint,
}

/// Accepts exactly one leaf certificate (or any, with `want` None, for [`inspect`],
/// which only reports it). Names, issuer and dates are not checked (the pin is the
/// trust), but the handshake signatures are: a peer that replays the certificate
/// without its private key still fails.
#[derive(Debug)]
struct Pin {
    want: Option<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        let Some(want) = self.want.filter(|w| *w != got) else {
            return Ok(ServerCertVerified::assertion());
        };
        let e = PinMismatch { got, want };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(e)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A rustls error in words, with what to do about the common ones.
fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "{e}: the certificate is not from a trusted CA; for a self-signed coordinator \
             pin it with --tls-fingerprint (`blocktrain doctor --coordinator URL` shows it)"
        ),
        rustls::Error::InvalidMessage(_) => {
            format!("{e}: is the coordinator serving plain HTTP? (then use http://)")
        }
        _ => e.to_string(),
    }
}

/// A TLS failure somewhere in `e`'s chain (an untrusted certificate, a pin that does not
/// match, a peer that does not speak TLS), in words: retrying will not help with these.
///
/// Transports wrap rustls errors in `io::Error`, whose `source()` skips the wrapped
/// error itself, so the walk also looks inside each `io::Error`.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(m) = tls_failure(inner) {
                return Some(m);
            }
        }
        cur = err.source();
    }
    None
}

/// What a TLS server presented.
#[derive(Clone, Debug)]
pub struct PeerCertificate {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's fingerprint.
    pub fingerprint: Fingerprint,
    /// The negotiated protocol version, e.g. `TLSv1_3`.
    pub version: String,
}

/// Connects to `host:port`, completes a TLS handshake accepting any certificate, and
/// returns what the server presented (for `blocktrain doctor` to judge with
/// [`TlsTrust::check`]; nothing is sent over the connection).
pub fn inspect(host: &str, port: u16, timeout: Duration) -> Result<PeerCertificate> {
    use std::net::ToSocketAddrs;
    let net = |e: std::io::Error| NodeError::Network(format!("{host}:{port}: {e}"));
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(net)?
        .next()
        .ok_or_else(|| NodeError::Network(format!("{host} does not resolve")))?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(net)?;
    sock.set_read_timeout(Some(timeout)).map_err(net)?;
    sock.set_write_timeout(Some(timeout)).map_err(net)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_config_err("TLS"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pin {
            want: None,
            algs: provider().signature_verification_algorithms,
        }))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| NodeError::Config(format!("{host}: {e}")))?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(tls_config_err("TLS"))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| {
            let why = tls_failure(&e).unwrap_or_else(|| e.to_string());
            NodeError::Network(format!("TLS handshake with {host}:{port}: {why}"))
        })?;
    }
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| NodeError::Network(format!("{host}:{port} presented no certificate")))?;
    Ok(PeerCertificate {
        fingerprint: Fingerprint::of(leaf),
        version: format!(
            "{:?}",
            conn.protocol_version()
                .unwrap_or(rustls::ProtocolVersion::Unknown(0))
        ),
        chain,
    })
}
