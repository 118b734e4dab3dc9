//! ed25519 identities: a node's secret key on disk, its public key as hex on the wire.
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;

use crate::{ProtocolError, Result};

/// A node's signing identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public_hex())
    }
}

impl Identity {
    /// A fresh random identity (OS randomness).
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// From the 32-byte secret seed.
    pub fn from_secret(secret: &[u8]) -> Result<Self> {
        let seed: [u8; 32] = secret.try_into().map_err(|_| {
            ProtocolError::Malformed(format!(
                "a key file holds 32 bytes, this one {}",
                secret.len()
            ))
        })?;
        Ok(Identity {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The 32-byte secret seed (what a key file stores).
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key, hex (64 characters): a worker's name on the wire.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Checks `signature` (hex) of `message` by `public` (hex).
pub fn verify(public: &str, message: &[u8], signature: &str) -> Result<()> {
    let bad = |m: &str| ProtocolError::Unauthenticated(m.to_string());
    let pk: [u8; 32] = hex::decode(public)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("public key is not 64 hex digits"))?;
    let sig: [u8; 64] = hex::decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("signature is not 128 hex digits"))?;
    let key = VerifyingKey::from_bytes(&pk).map_err(|_| bad("public key is not a curve point"))?;
    // verify_strict: refuses small-order keys and non-canonical signatures, so one
    // message has one valid signature per key (malleated copies do not pass).
    key.verify_strict(message, &Signature::from_bytes(&sig))
        .map_err(|_| bad("signature does not match"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn sign_verify_and_tamper() {
        let id = Identity::generate();
        let sig = hex::encode(id.sign(b"hello"));
        verify(&id.public_hex(), b"hello", &sig).unwrap();
        assert!(verify(&id.public_hex(), b"hellO", &sig).is_err());
        assert!(verify(&Identity::generate().public_hex(), b"hello", &sig).is_err());
        assert!(verify("zz", b"hello", &sig).is_err());
        let back = Identity::from_secret(&id.secret()).unwrap();
        assert_eq!(back.public_hex(), id.public_hex());
        assert!(Identity::from_secret(&[1, 2, 3]).is_err());
    }

    /// The identity point as a key, with R = identity and s = 0, "signs" every message
    /// under plain `verify` ([s]B = R + [k]A holds for any k); `verify_strict` refuses it.
    #[test]
    fn small_order_key_signs_nothing() {
        let mut point = [0u8; 32];
        point[0] = 1;
        let mut sig = [0u8; 64];
        sig[0] = 1;
        let (key, sig) = (hex::encode(point), hex::encode(sig));
        let weak = VerifyingKey::from_bytes(&point).unwrap();
        assert!(
            weak.verify(
                b"anything",
                &Signature::from_bytes(&hex::decode(&sig).unwrap().try_into().unwrap())
            )
            .is_ok(),
            "the forgery this test guards against"
        );
        assert!(verify(&key, b"anything", &sig).is_err());
    }
}
