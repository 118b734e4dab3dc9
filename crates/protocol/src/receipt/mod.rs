//! Training receipts and the Certificate-Transparency-style log that holds them.
//!
//! A worker signs a [`Claim`] about each update it uploads; the coordinator adds its
//! [`Decision`] and signs the whole as a [`Receipt`], which it appends to an append-only
//! Merkle log (RFC 6962/9162 via `ct-merkle`, SHA-256). It signs [`TreeHead`]s of that
//! log and hands out inclusion proofs (this receipt is in the log a head commits to) and
//! consistency proofs (an older head's log is a prefix of a newer one), so a worker can
//! check alone that its receipt is recorded and that the log was never rewritten.
//!
//! Every signed or hashed byte string is a domain tag plus the serde_json text of a
//! struct (fields in declaration order). That text is canonical because our writer is
//! deterministic and a JSON round trip reproduces it exactly (integers as written,
//! floats through shortest round-trip formatting), so a receipt parsed back from storage
//! or the wire re-derives the very bytes that were signed. Non-finite floats write as
//! `null`, and read back as `None`, which gives the same bytes again.
//!
//! Files: `entry` ([`Claim`], [`Decision`], [`Receipt`] and their signatures), `tree`
//! (the log's heads and proofs, and their checks).
use serde::Serialize;

use crate::identity::Identity;
use crate::ProtocolError;

mod entry;
mod tree;

pub use entry::{Claim, Decision, Receipt};
pub use tree::{
    verify_consistency, verify_inclusion, ConsistencyProof, InclusionProof, LogHash, ReceiptProof,
    TreeHead,
};

/// Version of the claim/receipt format this build writes and reads.
pub const RECEIPT_VERSION: u32 = 1;

// One tag per kind of signed or hashed bytes, side by side so they stay distinct.
const CLAIM_TAG: &[u8] = b"blocktrain/claim/v1\n";
const DECISION_TAG: &[u8] = b"blocktrain/decision/v1\n";
const LEAF_TAG: &[u8] = b"blocktrain/receipt-leaf/v1\n";
const HEAD_TAG: &[u8] = b"blocktrain/tree-head/v1\n";

fn tagged<T: Serialize>(tag: &[u8], value: &T) -> Vec<u8> {
    let mut out = tag.to_vec();
    // These structs hold only strings, numbers and options: serializing cannot fail.
    serde_json::to_writer(&mut out, value).expect("receipt types serialize");
    out
}

/// Prefixes an authentication failure with what was being checked.
fn context(what: &str, e: ProtocolError) -> ProtocolError {
    match e {
        ProtocolError::Unauthenticated(m) => ProtocolError::Unauthenticated(format!("{what}: {m}")),
        ProtocolError::Rejected(m) => ProtocolError::Rejected(format!("{what}: {m}")),
        ProtocolError::Malformed(m) => ProtocolError::Malformed(format!("{what}: {m}")),
    }
}

fn sign_hex(id: &Identity, message: &[u8]) -> String {
    hex::encode(id.sign(message))
}

#[cfg(test)]
mod float_tests;
#[cfg(test)]
mod tests;
