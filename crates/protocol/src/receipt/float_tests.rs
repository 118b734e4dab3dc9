use super::*;

/// A claim travels as JSON and is verified after parsing: floats must parse back to
/// the exact value (serde_json's `float_roundtrip`), or signatures over awkward
/// losses would fail at random.
#[test]
fn claims_with_awkward_floats_verify_after_a_json_round_trip() {
    let id = Identity::generate();
    for i in 0..2000u64 {
        let loss = 2.0 + (i as f64 * 0.618_033_988_749_895).fract() / 3.0;
        let claim = Claim {
            version: RECEIPT_VERSION,
            worker: id.public_hex(),
            lease: i as i64,
            block: 1,
            base_version: 2,
            update_blake3: "ab".repeat(32),
            steps: 5,
            data_bytes: 10,
            local_loss: Some(loss),
        };
        let sig = claim.sign(&id);
        let back: Claim = serde_json::from_slice(&serde_json::to_vec(&claim).unwrap()).unwrap();
        back.verify(&sig).unwrap();
    }
}
