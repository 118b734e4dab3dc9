//! JSON messages between workers and the coordinator (updates and checkpoints travel
//! as safetensors bytes, see [`crate::codec`]). Every request is signed
//! ([`crate::signed`]); these are the bodies.
use serde::{Deserialize, Serialize};

/// Version of this message set; a coordinator refuses workers that speak another.
pub const WIRE_VERSION: u32 = 1;

/// Where a worker's training bytes come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataShard {
    /// blake3 of the bytes (hex): recorded, so a run knows what it was trained on
    /// without the bytes ever leaving the worker.
    pub blake3: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// What a worker says about itself when it joins, and again with each work request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// [`WIRE_VERSION`] of the worker.
    pub wire_version: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Memory the worker can use, bytes (0 = unknown).
    pub memory_bytes: u64,
    /// Measured optimizer steps per second on its current block (None before the first round).
    pub step_rate: Option<f64>,
    /// Its own data (`worker --data`), or None for the run's shipped corpus.
    pub data: Option<DataShard>,
}

impl WorkerInfo {
    /// A worker on `device` that has not measured anything yet and brings no data.
    pub fn new(device: &str) -> Self {
        WorkerInfo {
            wire_version: WIRE_VERSION,
            device: device.to_string(),
            memory_bytes: 0,
            step_rate: None,
            data: None,
        }
    }
}

/// `POST /v1/register`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The worker.
    pub info: WorkerInfo,
    /// [`join_proof`] of the run's join secret for this key (runs with a secret only).
    pub join_proof: Option<String>,
}

/// `POST /v1/work` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WorkReply {
    /// Train this.
    Lease(Lease),
    /// Every block has its workers for this round; ask again later.
    Wait {
        /// Suggested delay before asking again.
        retry_ms: u64,
    },
    /// The run has finished.
    Done,
}

/// One unit of work: train `block` from `version` for `steps` steps, upload the delta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// Lease id (the update is posted to `/v1/updates/{id}`).
    pub id: i64,
    /// Block index, 0-based.
    pub block: usize,
    /// Version the delta must be computed against.
    pub version: u64,
    /// blake3 of that version's weights as served (download `/v1/blobs/{hash}` and check
    /// it): safetensors in the run's checkpoint codec (fp16 or fp32), decoded with
    /// [`crate::codec::decode`].
    pub weights_hash: String,
    /// Local optimizer steps.
    pub steps: i64,
    /// Windows per step.
    pub batch: i64,
    /// Seeds data order and masks of this lease.
    pub seed: u64,
    /// Shard of the run's corpus to draw from: `index` of `count` equal slices.
    pub shard_index: u32,
    /// Number of shards.
    pub shard_count: u32,
    /// Position of this round's first step in the block's LR schedule.
    pub schedule_step: i64,
    /// Length of the block's LR schedule.
    pub schedule_total: i64,
    /// Schedule steps this round spans (the reference H): a worker given more or fewer
    /// local steps spreads them over this span, so every worker of a round follows the
    /// same part of the schedule.
    pub schedule_span: i64,
    /// Update codec (`fp32`, `fp16`, `int8[:chunk]`, `topk:fraction`).
    pub codec: String,
    /// The lease lapses unless renewed (`/v1/leases/{id}/heartbeat`) within this time.
    pub lease_ms: u64,
    /// Train this lease on the run's corpus shard even if this worker brought its own
    /// data: the coordinator recomputes such leases (a spot check), so own data never
    /// exempts a worker from them.
    #[serde(default)]
    pub public_shard: bool,
    /// The block's optimizer state is carried: the checkpoint may hold the moments to
    /// start from (`adam.m/NAME`, and `adam.rms/NAME`, the square root of the second
    /// moment; none means zero moments), and the update must hold the moments' delta
    /// (end - start) beside the weights' delta.
    #[serde(default)]
    pub carry_moments: bool,
}

/// `POST /v1/leases/{id}/heartbeat` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// False when the round moved on without this lease: stop and ask for new work.
    pub still_wanted: bool,
}

/// `POST /v1/updates/{lease}` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateReply {
    /// Update id in the coordinator's records.
    pub update_id: i64,
    /// The block version after this update was processed (a merge may have happened).
    pub block_version: u64,
}

/// Error body of every non-2xx reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

/// Proof that a worker knows the run's join secret, bound to its key so it cannot be
/// reused by another key and the secret itself never crosses the wire.
pub fn join_proof(secret: &str, public_key_hex: &str) -> String {
    join_proof_hash(secret, public_key_hex).to_hex().to_string()
}

fn join_proof_hash(secret: &str, public_key_hex: &str) -> blake3::Hash {
    let key = blake3::hash(secret.as_bytes());
    blake3::keyed_hash(key.as_bytes(), public_key_hex.as_bytes())
}

/// Whether `given` is the join proof of `secret` for this key. The comparison runs in
/// constant time (`blake3::Hash`'s equality), so response timing does not leak how
/// many leading digits of a guess were right.
pub fn join_proof_matches(secret: &str, public_key_hex: &str, given: &str) -> bool {
    match blake3::Hash::from_hex(given) {
        Ok(given) => given == join_proof_hash(secret, public_key_hex),
        Err(_) => false,
    }
}

/// Whether `s` names content: exactly 64 lowercase hex digits (a blake3 hash, a public
/// key). Peer-supplied names are checked with this before they reach a path, a query
/// or a message.
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex64_names_only_content_hashes() {
        assert!(is_hex64(&"ab".repeat(32)));
        for bad in [
            "",
            "abc",
            &"AB".repeat(32),
            &"ab".repeat(33),
            &format!("{}é", "a".repeat(62)),
            &"g".repeat(64),
        ] {
            assert!(!is_hex64(bad), "{bad:?}");
        }
    }

    #[test]
    fn join_proof_binds_secret_and_key() {
        let p = join_proof("s3cret", "aa");
        assert_eq!(p, join_proof("s3cret", "aa"));
        assert_ne!(p, join_proof("s3cret", "ab"));
        assert!(join_proof_matches("s3cret", "aa", &p));
        assert!(!join_proof_matches("s3cret", "ab", &p));
        assert!(!join_proof_matches("other", "aa", &p));
        assert!(!join_proof_matches("s3cret", "aa", "zz"));
        assert!(!join_proof_matches("s3cret", "aa", ""));
        assert_ne!(p, join_proof("s3creT", "aa"));
    }

    #[test]
    fn work_reply_is_tagged_json() {
        let j = serde_json::to_string(&WorkReply::Wait { retry_ms: 5 }).unwrap();
        assert_eq!(j, r#"{"kind":"wait","retry_ms":5}"#);
        let back: WorkReply = serde_json::from_str(r#"{"kind":"done"}"#).unwrap();
        assert_eq!(back, WorkReply::Done);
    }
}
