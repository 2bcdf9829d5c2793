//! TLS for tests: a certificate authority and certificates made with the
//! `openssl` command line at test time, and an HTTPS/1.1 client (native-tls,
//! i.e. the system's OpenSSL) that can present a client certificate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::client::Response;

/// A certificate and its private key (PEM files).
#[derive(Debug, Clone)]
pub struct CertifiedKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertifiedKey {
    /// SHA-256 of the certificate (DER), lower-case hex, as Envoy reports it.
    pub fn sha256(&self) -> String {
        let out = openssl(&["x509", "-in", path(&self.cert), "-noout", "-fingerprint", "-sha256"]);
        out.trim().rsplit('=').next().unwrap_or_default().replace(':', "").to_ascii_lowercase()
    }
}

/// A certificate authority in its own directory.
pub struct Authority {
    dir: PathBuf,
    pub root: CertifiedKey,
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn openssl(args: &[&str]) -> String {
    let output = Command::new("openssl").args(args).output().expect("openssl");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Authority {
    /// A new CA (EC P-256, one day) named `name`, in a fresh directory.
    pub fn new(name: &str) -> Self {
        let dir = crate::paths::run_dir(&format!("pki-{name}"));
        let root = CertifiedKey { cert: dir.join("ca.pem"), key: dir.join("ca.key") };
        openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path(&root.key)]);
        let subject = format!("/CN={name} test CA");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            path(&root.key),
            "-subj",
            &subject,
            "-days",
            "1",
            "-out",
            path(&root.cert),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        Self { dir, root }
    }

    /// A certificate for `subject` (`/O=Example/CN=billing`) with these
    /// subjectAltName entries (`URI:spiffe://...`, `DNS:localhost`), signed by the CA.
    pub fn issue(&self, file_name: &str, subject: &str, san: &[&str], usage: &str) -> CertifiedKey {
        let issued = CertifiedKey {
            cert: self.dir.join(format!("{file_name}.pem")),
            key: self.dir.join(format!("{file_name}.key")),
        };
        let csr = self.dir.join(format!("{file_name}.csr"));
        let extensions = self.dir.join(format!("{file_name}.ext"));
        let mut lines = vec![format!("extendedKeyUsage = {usage}")];
        if !san.is_empty() {
            lines.push(format!("subjectAltName = {}", san.join(", ")));
        }
        std::fs::write(&extensions, lines.join("\n") + "\n").unwrap();
        openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path(&issued.key)]);
        openssl(&["req", "-new", "-key", path(&issued.key), "-subj", subject, "-out", path(&csr)]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&csr),
            "-CA",
            path(&self.root.cert),
            "-CAkey",
            path(&self.root.key),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            path(&extensions),
            "-out",
            path(&issued.cert),
        ]);
        issued
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> CertifiedKey {
        self.issue("server", "/CN=localhost", &["DNS:localhost", "IP:127.0.0.1"], "serverAuth")
    }

    pub fn client(&self, file_name: &str, subject: &str, san: &[&str]) -> CertifiedKey {
        self.issue(file_name, subject, san, "clientAuth")
    }
}

/// `GET path` over TLS (HTTP/1.1, one request, connection closed), trusting
/// `ca`, presenting `client` if given. `Err`: the handshake or the exchange failed.
pub fn https_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    ca: &Path,
    client: Option<&CertifiedKey>,
) -> Result<Response, String> {
    let mut builder = native_tls::TlsConnector::builder();
    let root = native_tls::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    builder.add_root_certificate(root).disable_built_in_roots(true);
    if let Some(client) = client {
        let identity = native_tls::Identity::from_pkcs8(
            &std::fs::read(&client.cert).unwrap(),
            &std::fs::read(&client.key).unwrap(),
        )
        .unwrap();
        builder.identity(identity);
    }
    let connector = builder.build().map_err(|error| error.to_string())?;
    let tcp = TcpStream::connect(addr).map_err(|error| error.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut stream = connector.connect("localhost", tcp).map_err(|error| format!("handshake: {error}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(|error| error.to_string())?;
    let mut raw = Vec::new();
    // TLS 1.3 reports a refused client certificate only at the first read.
    stream.read_to_end(&mut raw).map_err(|error| format!("read: {error}"))?;
    Response::from_http1(&raw).ok_or_else(|| format!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)))
}
