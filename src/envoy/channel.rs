//! The data-plane channel: what answers ext_proc, ext_authz and the access log answers
//! only Envoy. Those answers carry the real upstream credential, so a caller that merely
//! reaches the port must get nothing: over TCP, mutual TLS (certificates the operator
//! provides, or a local CA latchkey mints on first start); beside Envoy, a Unix socket
//! only its owner and group may open. Plain TCP only behind an opt-in named `insecure`.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::net::UnixListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The files of a minted local CA, under the TLS directory. Envoy's shipped configs name
/// them relative to the repository root (`.latchkey/tls/…`).
pub const CA_FILE: &str = "ca.pem";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const ENVOY_CERT_FILE: &str = "envoy.pem";
pub const ENVOY_KEY_FILE: &str = "envoy.key";

/// Resets of streams not yet accepted that one data-plane connection may carry at once:
/// as many as Envoy could have in flight to us, not h2's default of 20.
pub const PENDING_RESETS_ALLOWED: usize = 100_000;

/// How long minted certificates are valid, and the age at which a start mints new ones
/// (Envoy reads its certificates at start, so it is restarted after a renewal).
const VALIDITY: Duration = Duration::from_secs(365 * 86_400);
const RENEW_AFTER: Duration = Duration::from_secs(330 * 86_400);

/// The names the minted server certificate is valid for: Envoy checks one of them.
const SERVER_NAMES: [&str; 2] = ["localhost", "latchkey"];

/// Server certificate, key and client CA given by the operator (e.g. cert-manager).
#[derive(Debug, Clone)]
pub struct ProvidedTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// How the data-plane listener authenticates its callers.
#[derive(Debug, Clone)]
pub enum Guard {
    /// Mutual TLS with the operator's certificates.
    Provided(ProvidedTls),
    /// Mutual TLS with a local CA kept (and minted when missing) in this directory.
    Minted(PathBuf),
    /// Plain TCP: anyone who reaches the port gets answers. Opt-in only.
    Insecure,
}

impl Guard {
    /// The server side of mutual TLS: latchkey's identity, and the CA whose client
    /// certificates it accepts (any other caller fails the handshake).
    pub fn server_tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let provided = match self {
            Guard::Insecure => return Ok(None),
            Guard::Provided(provided) => provided.clone(),
            Guard::Minted(dir) => {
                ensure_minted(dir)?;
                ProvidedTls {
                    cert: dir.join(SERVER_CERT_FILE),
                    key: dir.join(SERVER_KEY_FILE),
                    client_ca: dir.join(CA_FILE),
                }
            }
        };
        let read = |path: &PathBuf, what: &str| {
            fs::read(path)
                .with_context(|| format!("reading the ext_proc TLS {what} {}", path.display()))
        };
        let identity = Identity::from_pem(
            read(&provided.cert, "certificate")?,
            read(&provided.key, "key")?,
        );
        let client_ca = Certificate::from_pem(read(&provided.client_ca, "client CA")?);
        Ok(Some(
            ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(client_ca),
        ))
    }
}

/// Mints a local CA, latchkey's server certificate and Envoy's client certificate into
/// `dir`, unless a set younger than [`RENEW_AFTER`] is there. The CA's key is not kept:
/// nothing can sign another client certificate, and a renewal mints a new CA. Written
/// to a private directory first and moved into place whole, so two replicas starting at
/// once end up sharing one set.
pub fn ensure_minted(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        // Whoever could write here could plant a CA of their own.
        check_private(dir)?;
    }
    if is_fresh(dir) {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let staging = dir.with_extension(format!("minting-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("creating {}", staging.display()))?;
    mint(&staging)?;
    if dir.exists() {
        // An expired or partial set: only its own files go, and the directory only if
        // nothing else is in it (a misconfigured path never loses anything else).
        for file in FILES {
            let _ = fs::remove_file(dir.join(file));
        }
        if let Err(e) = fs::remove_dir(dir) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e)
                .with_context(|| format!("{} holds other files; not replacing it", dir.display()));
        }
    }
    if fs::rename(&staging, dir).is_err() {
        // Another replica moved its set in first: use that one.
        let _ = fs::remove_dir_all(&staging);
        if !is_fresh(dir) {
            bail!(
                "could not place the minted certificates in {}",
                dir.display()
            );
        }
    }
    check_private(dir)?;
    tracing::info!(dir = %dir.display(), "minted a local CA and certificates for the ext_proc channel");
    Ok(())
}

const FILES: [&str; 5] = [
    CA_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    ENVOY_CERT_FILE,
    ENVOY_KEY_FILE,
];

/// The user this process runs as: the owner of its own `/proc` entry.
pub fn own_uid() -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|m| m.uid())
}

/// The directory and its files are this user's own, not links, and nobody else may
/// write them (nor read the keys).
fn check_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = own_uid().context("finding latchkey's own user")?;
    let meta = fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        bail!(
            "{} must be a directory of latchkey's own user that only it can open (mode 0700)",
            dir.display()
        );
    }
    for file in FILES {
        let path = dir.join(file);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let private_key = file.ends_with(".key");
        let others = if private_key { 0o077 } else { 0o022 };
        if !meta.is_file() || meta.uid() != me || meta.mode() & others != 0 {
            bail!(
                "{} must be a plain file of latchkey's own user, that only it can change{}",
                path.display(),
                if private_key { " or read" } else { "" }
            );
        }
    }
    Ok(())
}

fn is_fresh(dir: &Path) -> bool {
    let all_there = FILES.iter().all(|f| dir.join(f).is_file());
    let age = fs::metadata(dir.join(CA_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    all_there && age.is_some_and(|a| a < RENEW_AFTER)
}

fn mint(dir: &Path) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + VALIDITY;
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "latchkey local ext_proc CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let issuer = CertifiedIssuer::self_signed(ca, ca_key)?;

    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose, sans: Vec<SanType>| {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer)?;
        anyhow::Ok((cert.pem(), key.serialize_pem()))
    };
    let mut server_sans = SERVER_NAMES
        .iter()
        .map(|n| Ok(SanType::DnsName((*n).try_into()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    server_sans.push(SanType::IpAddress([127, 0, 0, 1].into()));
    server_sans.push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    let (server_cert, server_key) =
        leaf("latchkey", ExtendedKeyUsagePurpose::ServerAuth, server_sans)?;
    let (envoy_cert, envoy_key) = leaf("envoy", ExtendedKeyUsagePurpose::ClientAuth, Vec::new())?;

    write(dir, CA_FILE, issuer.pem().as_bytes(), 0o644)?;
    write(dir, SERVER_CERT_FILE, server_cert.as_bytes(), 0o644)?;
    write(dir, SERVER_KEY_FILE, server_key.as_bytes(), 0o600)?;
    write(dir, ENVOY_CERT_FILE, envoy_cert.as_bytes(), 0o644)?;
    write(dir, ENVOY_KEY_FILE, envoy_key.as_bytes(), 0o600)
}

fn write(dir: &Path, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .and_then(|mut f| f.write_all(contents))
        .with_context(|| format!("writing {}", path.display()))
}

/// A Unix socket that only its owner and group may connect to (0660). It is bound
/// inside a private directory, given its mode, and only then moved to `path`: nobody
/// can connect in between.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    bind_unix_as(path, 0o660)
}

/// [`bind_unix`], the socket given permissions `mode` before anyone can reach it.
pub fn bind_unix_as(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    // A socket file left by a previous run would refuse the bind.
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        fs::remove_file(path).ok();
    }
    let private = path.with_extension(format!("binding-{}", std::process::id()));
    let _ = fs::remove_dir_all(&private);
    DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let staged = private.join("socket");
    let placed = UnixListener::bind(&staged)
        .with_context(|| format!("cannot listen on unix:{}", path.display()))
        .and_then(|listener| {
            fs::set_permissions(&staged, fs::Permissions::from_mode(mode))?;
            fs::rename(&staged, path)
                .with_context(|| format!("moving the socket to {}", path.display()))?;
            Ok(listener)
        });
    let _ = fs::remove_dir_all(&private);
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mints_once_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("state/tls");
        ensure_minted(&tls).unwrap();
        let ca = fs::read(tls.join(CA_FILE)).unwrap();
        for (file, mode) in [
            (SERVER_KEY_FILE, 0o600),
            (ENVOY_KEY_FILE, 0o600),
            (CA_FILE, 0o644),
        ] {
            let meta = fs::metadata(tls.join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        assert_eq!(
            fs::metadata(&tls).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A second start keeps the set Envoy was given.
        ensure_minted(&tls).unwrap();
        assert_eq!(fs::read(tls.join(CA_FILE)).unwrap(), ca);
        assert!(Guard::Minted(tls.clone()).server_tls().unwrap().is_some());
        // A directory others may write is not trusted.
        fs::set_permissions(&tls, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(ensure_minted(&tls).is_err());
        fs::set_permissions(&tls, fs::Permissions::from_mode(0o700)).unwrap();
        // An expired set is replaced; a directory that holds more is left alone.
        fs::write(tls.join("notes.txt"), "mine").unwrap();
        fs::remove_file(tls.join(CA_FILE)).unwrap();
        assert!(ensure_minted(&tls).is_err());
        assert!(tls.join("notes.txt").exists());
        fs::remove_file(tls.join("notes.txt")).unwrap();
        ensure_minted(&tls).unwrap();
        assert_ne!(fs::read(tls.join(CA_FILE)).unwrap(), ca);
    }

    #[tokio::test]
    async fn unix_sockets_are_owner_and_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ext_proc.sock");
        let _listener = bind_unix(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "staging removed"
        );
        tokio::net::UnixStream::connect(&path).await.unwrap();
    }
}
