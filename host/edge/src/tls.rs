//! TLS for the data-plane listeners, with certificates that reload without
//! a restart: each TLS listener resolves its certificate through a slot
//! that a reload swaps atomically. Connections already open keep the
//! certificate they shook hands with; new ones get the new one.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use edge_config::TlsConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio_rustls::TlsAcceptor;

/// Why a certificate and key pair could not be used; the listener keeps
/// the pair it had.
#[derive(Debug, thiserror::Error)]
#[error("TLS files {cert} / {key}: {message}")]
pub struct TlsFilesError {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub message: String,
}

/// Why a TLS reload was refused: every listener keeps its certificate.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: {source}")]
pub struct TlsReloadError {
    /// The configured address of the listener whose files failed.
    pub listener: String,
    #[source]
    pub source: TlsFilesError,
}

/// A certificate a reload put in place.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadedCertificate {
    /// The listener's configured address.
    pub listener: String,
    pub cert: PathBuf,
    /// sha256 of the end-entity certificate (DER), in hex.
    pub sha256: String,
}

/// One TLS listener's files and its current certificate.
struct CertificateSlot {
    listener: String,
    files: TlsConfig,
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for CertificateSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateSlot")
            .field("listener", &self.listener)
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The node's TLS listeners' certificates.
#[derive(Clone, Default)]
pub(crate) struct Certificates(Arc<std::sync::Mutex<Vec<Arc<CertificateSlot>>>>);

impl Certificates {
    /// Loads `files` for the listener at `listener` and returns its
    /// acceptor (h2 and HTTP/1.1 by ALPN), whose certificate
    /// [`Certificates::reload`] replaces.
    pub(crate) fn add(
        &self,
        listener: &str,
        files: &TlsConfig,
    ) -> Result<TlsAcceptor, TlsFilesError> {
        let key = load(files)?;
        record_expiry(listener, &key);
        let slot = Arc::new(CertificateSlot {
            listener: listener.to_owned(),
            files: files.clone(),
            current: ArcSwap::from_pointee(key),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| files_error(files, e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        self.slots().push(slot);
        Ok(TlsAcceptor::from(Arc::new(server)))
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<CertificateSlot>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads every TLS listener's certificate and key files again (the
    /// paths the node started with). Only when every pair loads and matches
    /// do they replace the current ones, all at once; otherwise nothing
    /// changes and the error names the listener and the reason.
    pub(crate) async fn reload(&self) -> Result<Vec<ReloadedCertificate>, TlsReloadError> {
        let slots = self.slots().clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut loaded = Vec::with_capacity(slots.len());
            for slot in &slots {
                let key = load(&slot.files).map_err(|source| TlsReloadError {
                    listener: slot.listener.clone(),
                    source,
                })?;
                loaded.push(key);
            }
            let mut reloaded = Vec::with_capacity(slots.len());
            for (slot, key) in slots.iter().zip(loaded) {
                reloaded.push(ReloadedCertificate {
                    listener: slot.listener.clone(),
                    cert: slot.files.cert.clone(),
                    sha256: key
                        .cert
                        .first()
                        .map(|leaf| breakwater_sandbox::sha256_hex(leaf.as_ref()))
                        .unwrap_or_default(),
                });
                record_expiry(&slot.listener, &key);
                slot.current.store(Arc::new(key));
            }
            Ok(reloaded)
        })
        .await
        .unwrap_or_else(|e| {
            Err(TlsReloadError {
                listener: String::new(),
                source: TlsFilesError {
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    message: format!("the reload task failed: {e}"),
                },
            })
        });
        match &outcome {
            Ok(reloaded) => {
                metrics::counter!("breakwater_tls_reloads_total", "result" => "ok").increment(1);
                for certificate in reloaded {
                    tracing::info!(listener = %certificate.listener, sha256 = %certificate.sha256,
                        "TLS certificate reloaded");
                }
            }
            Err(error) => {
                metrics::counter!("breakwater_tls_reloads_total", "result" => "failed")
                    .increment(1);
                tracing::error!(%error, "TLS reload failed; the current certificates keep serving");
            }
        }
        outcome
    }
}

/// `breakwater_tls_certificate_expiry_timestamp_seconds{listener}`: when
/// the certificate `listener` serves stops being valid (its `notAfter`),
/// for an alert weeks ahead. A leaf that does not parse leaves the series
/// as it was: rustls accepted it, and an alert on a stale value is safer
/// than none.
fn record_expiry(listener: &str, key: &CertifiedKey) {
    let Some(leaf) = key.cert.first() else {
        return;
    };
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, certificate)) => {
            let not_after = certificate.validity().not_after.timestamp();
            metrics::gauge!("breakwater_tls_certificate_expiry_timestamp_seconds", "listener" => listener.to_owned())
                .set(not_after as f64);
        }
        Err(error) => {
            tracing::warn!(listener, %error, "the certificate's expiry could not be read");
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn files_error(files: &TlsConfig, message: String) -> TlsFilesError {
    TlsFilesError {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message,
    }
}

/// The certificate chain and key in `files`, checked to belong together.
fn load(files: &TlsConfig) -> Result<CertifiedKey, TlsFilesError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |message: String| files_error(files, message);
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(format!("reading certificates: {e}")))?;
    if certs.is_empty() {
        return Err(fail("the certificate file holds no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| fail(format!("reading the private key: {e}")))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            fail("the private key does not belong to the certificate".to_owned())
        }
        other => fail(other.to_string()),
    })
}
