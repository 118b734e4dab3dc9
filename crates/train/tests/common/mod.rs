//! Helpers of the coordinator tests: a tiny run, registered test keys, leases, signed
//! claims and synthetic deltas.
#![allow(dead_code, unused_imports)] // each test file uses its own subset

pub use blocktrain_model::config::ModelConfig;
pub use blocktrain_protocol::codec::{self, Array, Arrays, Codec};
pub use blocktrain_protocol::identity::Identity;
pub use blocktrain_protocol::receipt::{Claim, RECEIPT_VERSION};
pub use blocktrain_protocol::wire::{join_proof, Lease, RegisterRequest, WorkReply, WorkerInfo};
pub use blocktrain_train::config::{OuterKind, RunConfig};
pub use blocktrain_train::coordinator::Coordinator;
pub use blocktrain_train::NodeError;

pub fn tiny(blocks: usize, per_block: u32) -> RunConfig {
    let mut c = RunConfig {
        blocks,
        model: ModelConfig::tiny_block(),
        ..Default::default()
    };
    c.training.workers_per_block = per_block;
    c.training.rounds = 3;
    c.training.local_steps = 4;
    c.outer.optimizer = OuterKind::Average;
    c.wire.checkpoint_codec = "fp32".into(); // exact arithmetic in these tests
    c.wire.codec = "int8".into(); // updates may come in this codec or a more precise one
    c.faults.lease_secs = 10.0;
    c.faults.round_timeout_secs = 100.0;
    // These tests send synthetic deltas to test the rules; screening and spot checks
    // (which would rightly refuse them) have their own tests.
    c.trust.screen_windows = 0;
    c.trust.spot_check_fraction = 0.0;
    // Synthetic deltas hold weights only; carried moments have their own tests
    // (`merge.rs`, `verify.rs`, `worker_run.rs`).
    c.training.optimizer_state = blocktrain_train::config::OptimizerState::Fresh;
    c
}

pub fn info() -> WorkerInfo {
    WorkerInfo::new("cpu")
}

pub fn join(c: &mut Coordinator, key: &str) {
    c.register(
        key,
        &RegisterRequest {
            info: info(),
            join_proof: None,
        },
        0,
    )
    .unwrap();
}

/// A new run in `dir` with workers key(1) and key(2) registered.
pub fn with_two_workers(dir: &std::path::Path, cfg: RunConfig) -> Coordinator {
    let mut c = Coordinator::open(dir, Some(cfg), 0).unwrap();
    join(&mut c, &key(1));
    join(&mut c, &key(2));
    c
}

pub fn lease(c: &mut Coordinator, key: &str, now: u64) -> Lease {
    match c.request_work(key, &info(), now).unwrap() {
        WorkReply::Lease(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

pub fn key(i: u8) -> String {
    Identity::from_secret(&[i; 32]).unwrap().public_hex()
}

/// The worker's signed claim for uploading `body` on lease `l` (what a real worker sends).
pub fn claim(k: &str, l: &Lease, body: &[u8]) -> Option<(Claim, String)> {
    let id = (0..=255u8)
        .map(|i| Identity::from_secret(&[i; 32]).unwrap())
        .find(|id| id.public_hex() == k)
        .expect("a test key");
    let c = Claim {
        version: RECEIPT_VERSION,
        worker: k.to_string(),
        lease: l.id,
        block: l.block as u32,
        base_version: l.version,
        update_blake3: blake3::hash(body).to_hex().to_string(),
        steps: l.steps,
        data_bytes: 0,
        local_loss: None,
    };
    let sig = c.sign(&id);
    Some((c, sig))
}

/// The weights of a lease's checkpoint, as arrays.
pub fn weights(c: &Coordinator, k: &str, l: &Lease) -> Arrays {
    let (path, _) = c.checkpoint_file(k, &l.weights_hash).unwrap();
    let bytes = std::fs::read(path).unwrap();
    codec::decode(&bytes, &codec::header_shapes(&bytes).unwrap(), usize::MAX)
        .unwrap()
        .0
}

pub fn filled(like: &Arrays, v: f32) -> Arrays {
    like.iter()
        .map(|(n, a)| {
            (
                n.clone(),
                Array {
                    shape: a.shape.clone(),
                    data: vec![v; a.data.len()],
                },
            )
        })
        .collect()
}

/// Submits `like` filled with `v`, fp32.
pub fn submit(
    c: &mut Coordinator,
    k: &str,
    l: &Lease,
    like: &Arrays,
    v: f32,
    now: u64,
) -> Result<u64, NodeError> {
    submit_as(c, k, l, like, v, Codec::Fp32, now)
}

/// Submits `like` filled with `v` in `codec`; returns the block's version after it.
pub fn submit_as(
    c: &mut Coordinator,
    k: &str,
    l: &Lease,
    like: &Arrays,
    v: f32,
    codec: Codec,
    now: u64,
) -> Result<u64, NodeError> {
    let body = codec::encode(&filled(like, v), codec);
    c.submit_update(k, l.id, &body, None, claim(k, l, &body), now)
        .map(|r| r.block_version)
}

pub fn head_hash(c: &Coordinator, block: usize) -> String {
    c.status().unwrap().blocks[block].weights.clone()
}
