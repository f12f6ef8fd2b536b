//! Who the release server is to a fetch: the origin its credentials are kept to, and
//! the private CAs it may be trusted by instead of the web's.

use std::path::Path;

use super::FetchError;

/// TLS that trusts only the CAs in `path` (a private release server's PKI), instead of
/// the public web PKI.
pub(super) fn private_roots(path: &Path) -> Result<ureq::tls::TlsConfig, FetchError> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let pem = std::fs::read(path).map_err(|source| FetchError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(source) => {
                return Err(FetchError::CaFilePem {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    if certs.is_empty() {
        return Err(FetchError::CaFileEmpty {
            path: path.to_owned(),
        });
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&certs))
        .build())
}

/// Scheme, host and port of a URL (the port made explicit).
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = match (uri.port_u16(), scheme.as_str()) {
        (Some(p), _) => p,
        (None, "https") => 443,
        (None, "http") => 80,
        _ => return None,
    };
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

/// Whether `url` is on the same origin (scheme, host, port) as `base`: only then does
/// it get the release server's credentials.
pub fn same_origin(url: &str, base: &str) -> bool {
    matches!((origin(url), origin(base)), (Some(a), Some(b)) if a == b)
}
