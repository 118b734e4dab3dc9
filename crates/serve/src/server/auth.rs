//! Who may use a server: an allowlist of client keys and/or a join secret, checked once
//! per connection against the `Hello` that signs its greeting's challenge; and the key
//! files behind them (a server's own key, allowlists, secrets).
use std::collections::HashSet;
use std::path::Path;

use blocktrain_protocol::frame::Hello;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{is_hex64, join_proof_matches};

use crate::{io_err, ServeError};

/// A server's admission rule; with neither part set, anyone may connect.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    /// Public keys (hex) admitted; None: any key (that knows the secret, if set).
    pub allow: Option<HashSet<String>>,
    /// A secret every client proves it knows (`wire::join_proof`), as for workers.
    pub join_secret: Option<String>,
}

impl ClientAuth {
    /// Whether requests need a `Hello` first.
    pub fn required(&self) -> bool {
        self.allow.is_some() || self.join_secret.is_some()
    }

    /// Checks a `Hello` for the connection of `challenge` to the server of `server_key`;
    /// returns the client's key.
    pub(super) fn check(
        &self,
        hello: &Hello,
        challenge: &str,
        server_key: &str,
    ) -> Result<String, String> {
        hello
            .verify(challenge, server_key)
            .map_err(|e| format!("bad Hello: {e} (a Hello is good for one connection only)"))?;
        if let Some(allow) = &self.allow {
            if !allow.contains(&hello.key) {
                return Err(format!(
                    "key {} is not on this server's allowlist (--allow-keys)",
                    &hello.key[..16]
                ));
            }
        }
        if let Some(secret) = &self.join_secret {
            let proved = hello
                .join_proof
                .as_deref()
                .is_some_and(|p| join_proof_matches(secret, &hello.key, p));
            if !proved {
                return Err(
                    "this server needs its join secret, and the proof given is missing or wrong (--join-secret-file)"
                        .into(),
                );
            }
        }
        Ok(hello.key.clone())
    }
}

/// An allowlist file: one public key (64 hex digits) per line, `#` comments.
pub fn load_allow_keys(path: &Path) -> Result<HashSet<String>, ServeError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut keys = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let k = line.split('#').next().unwrap_or("").trim().to_lowercase();
        if k.is_empty() {
            continue;
        }
        if !is_hex64(&k) {
            return Err(ServeError::Config(format!(
                "{}:{}: not a public key (64 hex digits)",
                path.display(),
                i + 1
            )));
        }
        keys.insert(k);
    }
    if keys.is_empty() {
        return Err(ServeError::Config(format!(
            "{}: no keys (an empty allowlist would admit nobody)",
            path.display()
        )));
    }
    Ok(keys)
}

/// A join secret file: its first line, trimmed (at least 8 characters).
pub fn load_join_secret(path: &Path) -> Result<String, ServeError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.len() < 8 {
        return Err(ServeError::Config(format!(
            "{}: a join secret must be at least 8 characters",
            path.display()
        )));
    }
    Ok(secret)
}

/// A key file (the secret seed as hex, as workers keep theirs), created with mode 0600
/// on first use.
pub fn load_or_create_key(path: &Path) -> Result<Identity, ServeError> {
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let secret = hex::decode(text.trim())
            .map_err(|_| ServeError::Config(format!("{}: not a hex key file", path.display())))?;
        return Identity::from_secret(&secret)
            .map_err(|e| ServeError::Config(format!("{}: {e}", path.display())));
    }
    let id = Identity::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io_err(path))?;
    std::io::Write::write_all(&mut f, format!("{}\n", hex::encode(id.secret())).as_bytes())
        .map_err(io_err(path))?;
    Ok(id)
}
