//! TLS for the coordinator's HTTP API.
//!
//! Signatures already authenticate every request; TLS adds secrecy (join proofs,
//! updates, checkpoints) and tells a worker it reached the coordinator it meant.
//!
//! - The server side ([`ServerTls`]): a PEM certificate chain and key, or a self-signed
//!   certificate generated once into the coordinator's state directory (its fingerprint
//!   stays the same across restarts, so pinned workers keep working).
//! - The client side ([`TlsTrust`], in `trust`): the built-in public roots, a private
//!   CA, or one pinned certificate fingerprint for self-signed coordinators.
//!
//! A [`Fingerprint`] is the SHA-256 of the leaf certificate's DER, the value
//! `openssl x509 -noout -fingerprint -sha256` prints.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::{io_err, NodeError, Result};

mod trust;

pub use trust::{inspect, tls_failure, PeerCertificate, PinMismatch, TlsTrust};

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = NodeError;

    /// 64 hex digits; colons and case are ignored so that openssl's `AB:CD:...` form
    /// pastes as it is.
    fn from_str(s: &str) -> Result<Fingerprint> {
        let digits: String = s.trim().chars().filter(|c| *c != ':').collect();
        let bad = || {
            NodeError::Config(format!(
                "'{s}' is not a SHA-256 certificate fingerprint (64 hex digits)"
            ))
        };
        let bytes = hex::decode(digits.to_ascii_lowercase()).map_err(|_| bad())?;
        Ok(Fingerprint(bytes.try_into().map_err(|_| bad())?))
    }
}

/// The one crypto provider used for both sides: ring, which reqwest's rustls already
/// links (naming it avoids depending on a process-wide default).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config_err(what: &str) -> impl FnOnce(rustls::Error) -> NodeError + '_ {
    move |e| NodeError::Config(format!("{what}: {e}"))
}

/// What the coordinator serves TLS with.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) config: Arc<rustls::ServerConfig>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({})", self.fingerprint)
    }
}

impl ServerTls {
    /// From PEM text: the certificate chain (leaf first) and its private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerTls> {
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| NodeError::Config(format!("TLS certificate: {e}")))?;
        let Some(leaf) = certs.first() else {
            return Err(NodeError::Config(
                "TLS certificate: no CERTIFICATE block in the PEM".into(),
            ));
        };
        let fingerprint = Fingerprint::of(leaf);
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| NodeError::Config(format!("TLS key: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_config_err("TLS"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(tls_config_err("TLS certificate and key"))?;
        // The API is HTTP/1.1 only (what the server loop speaks).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            fingerprint,
        })
    }

    /// From PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerTls> {
        let c = std::fs::read(cert).map_err(io_err(cert))?;
        let k = std::fs::read(key).map_err(io_err(key))?;
        ServerTls::from_pem(&c, &k)
    }

    /// The self-signed certificate in `dir` (`tls-cert.pem`, `tls-key.pem`), generated
    /// for `names` (DNS names or IP addresses) the first time. Reusing it keeps the
    /// fingerprint that workers pinned. Returns it and whether it was just created.
    pub fn self_signed_in(dir: &Path, names: &[String]) -> Result<(ServerTls, SelfSigned)> {
        let cert = dir.join("tls-cert.pem");
        let key = dir.join("tls-key.pem");
        let created = !cert.exists() || !key.exists();
        if created {
            let (c, k) = self_signed(names)?;
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            write_private(&key, k.as_bytes())?;
            std::fs::write(&cert, c).map_err(io_err(&cert))?;
        }
        let tls = ServerTls::from_pem_files(&cert, &key)?;
        Ok((tls, SelfSigned { cert, key, created }))
    }

    /// SHA-256 of the leaf certificate (what workers pin).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// Where [`ServerTls::self_signed_in`] keeps its certificate.
#[derive(Clone, Debug)]
pub struct SelfSigned {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// Generated by this call (not found from an earlier start).
    pub created: bool,
}

/// A new self-signed certificate for `names` (rcgen's defaults: an ECDSA P-256 key,
/// valid far into the future: its trust comes from the pin, not from expiry).
/// Returns (certificate PEM, private key PEM).
pub fn self_signed(names: &[String]) -> Result<(String, String)> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| NodeError::Config(format!("self-signed certificate: {e}")))?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

/// Writes a secret readable by its owner only (created with that mode, never widened).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_openssl_and_plain_form() {
        let f = Fingerprint([0xab; 32]);
        let openssl = vec!["AB"; 32].join(":");
        assert_eq!(openssl.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
        assert!("abcd".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn a_self_signed_certificate_is_kept_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let (a, first) = ServerTls::self_signed_in(dir.path(), &names).unwrap();
        assert!(first.created);
        let (b, again) = ServerTls::self_signed_in(dir.path(), &names).unwrap();
        assert!(!again.created);
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&first.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The fingerprint is the leaf's DER hash.
        let pem = std::fs::read(&first.cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(Fingerprint::of(&der), a.fingerprint());
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let (c1, _) = self_signed(&["a".into()]).unwrap();
        let (_, k2) = self_signed(&["b".into()]).unwrap();
        let e = ServerTls::from_pem(c1.as_bytes(), k2.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("TLS certificate and key"), "{e}");
        let e = ServerTls::from_pem(b"nothing", k2.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
