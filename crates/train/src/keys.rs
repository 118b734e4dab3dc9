//! Key files: an ed25519 identity's secret seed as hex on disk. Workers and the
//! coordinator both keep one, so it lives in neither.
use std::path::Path;

use blocktrain_protocol::identity::Identity;

use crate::{io_err, NodeError, Result};

/// Loads an identity (a worker's or the coordinator's), creating it (mode 0600) on
/// first use.
pub fn load_or_create_key(path: &Path) -> Result<Identity> {
    if path.exists() {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let text = String::from_utf8_lossy(&bytes);
        let secret = hex::decode(text.trim())
            .map_err(|_| NodeError::Config(format!("{}: not a hex key file", path.display())))?;
        return Identity::from_secret(&secret)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())));
    }
    let id = Identity::generate();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io_err(path))?;
    std::io::Write::write_all(&mut f, format!("{}\n", hex::encode(id.secret())).as_bytes())
        .map_err(io_err(path))?;
    eprintln!(
        "created key {} (public {})",
        path.display(),
        id.public_hex()
    );
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k/worker.key");
        let a = load_or_create_key(&p).unwrap();
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(a.public_hex(), b.public_hex());
        std::fs::write(&p, "nothex").unwrap();
        assert!(load_or_create_key(&p)
            .unwrap_err()
            .to_string()
            .contains("hex"));
    }
}
