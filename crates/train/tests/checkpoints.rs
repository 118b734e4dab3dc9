//! The checkpoints a coordinator serves and keeps, with an explicit clock: compressed
//! download copies beside the fp32 master, pruning of old versions' files, and the
//! optimizer moments a carrying run serves. Split from `coordinator.rs` (the rules of
//! assignment, rounds and updates) to keep each file under the 500-line rule.
mod common;
use common::*;

#[test]
fn workers_download_compressed_copies_while_merges_stay_fp32() {
    // (codec, size vs fp32 at most, error bound relative to the tensor's largest value)
    for (name, codec, size, tol) in [
        ("fp16", Codec::Fp16, 0.6, 1e-3),
        ("int8", Codec::Int8 { chunk: 256 }, 0.35, 1.0 / 127.0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny(1, 1);
        cfg.wire.checkpoint_codec = name.into();
        let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
        join(&mut c, &key(1));
        let l = lease(&mut c, &key(1), 0);
        let read = |h: &str| std::fs::read(c.checkpoint_file(&key(1), h).unwrap().0).unwrap();
        let master_hash = c.status().unwrap().blocks[0].weights.clone();
        assert_ne!(l.weights_hash, master_hash);
        let (wire, master) = (read(&l.weights_hash), read(&master_hash));
        assert!(
            (wire.len() as f64) < size * master.len() as f64,
            "{name}: {} vs {}",
            wire.len(),
            master.len()
        );
        let decode =
            |b: &[u8]| codec::decode(b, &codec::header_shapes(b).unwrap(), usize::MAX).unwrap();
        let ((wq, cq), (w32, _)) = (decode(&wire), decode(&master));
        assert_eq!(cq, codec);
        for (n, a) in &w32 {
            let top = a.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (x, y) in a.data.iter().zip(&wq[n].data) {
                assert!((x - y).abs() <= tol * top, "{name} {n}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn old_checkpoint_files_are_pruned_but_history_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 1);
    cfg.training.rounds = 5;
    cfg.faults.keep_versions = 2;
    let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
    join(&mut c, &key(1));
    let mut wires = Vec::new();
    for round in 0..4u64 {
        let l = lease(&mut c, &key(1), round * 10);
        wires.push(l.weights_hash.clone());
        let w = weights(&c, &key(1), &l);
        let v = 0.001 * (1.0 + round as f32); // distinct bodies: identical ones are replays
        submit(&mut c, &key(1), &l, &w, v, round * 10 + 1).unwrap();
    }
    // Version 4 is the head: versions 3 and 4 keep their files, 0..=2 do not.
    assert_eq!(c.history(0).unwrap().len(), 5);
    for (v, h) in wires.iter().enumerate() {
        let found = c.checkpoint_file(&key(1), h);
        assert_eq!(found.is_ok(), v >= 3, "version {v}");
    }
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    // tiny(): fp32 copies (the wire copy is the master file) and no momentum (averaging):
    // one file per kept version.
    assert_eq!(blobs, 2);
}

/// A run that carries optimizer state: an update's moment delta is bounded (refused by
/// name past 2.2 x grad_clip, the block unchanged), and what a merge serves next is
/// projected into honest Adam's set, so an in-bound forgery cannot leave the block
/// with moments that blow up its next leases.
#[test]
fn carried_moments_are_bounded_at_upload_and_projected_at_merge() {
    use blocktrain_train::config::OptimizerState;
    use blocktrain_train::moments;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 1);
    cfg.training.optimizer_state = OptimizerState::Carry;
    let clip = cfg.optim.grad_clip as f32;
    let mut c = with_two_workers(dir.path(), cfg);
    let a = lease(&mut c, &key(1), 0);
    assert!(a.carry_moments);
    let w0 = weights(&c, &key(1), &a);
    assert!(
        w0.keys().all(|n| !moments::is_moment(n)),
        "version 0 serves no moments"
    );
    let shapes = w0
        .iter()
        .map(|(n, x)| (n.clone(), x.shape.clone()))
        .collect();
    let with = |m: f32, r: f32| -> Vec<u8> {
        let mut mo = moments::zeros(&shapes);
        for (n, x) in mo.iter_mut() {
            let v = if n.starts_with("adam.m/") { m } else { r };
            x.data.iter_mut().for_each(|d| *d = v);
        }
        codec::encode(&moments::join(filled(&w0, 1e-4), mo), Codec::Fp32)
    };
    // Roots of 1000 per coordinate: far past any clipped gradient.
    let before = head_hash(&c, 0);
    let huge = with(0.0, 1000.0);
    let e = c
        .submit_update(&key(1), a.id, &huge, None, claim(&key(1), &a, &huge), 1)
        .unwrap_err();
    assert!(e.to_string().contains("optimizer-state delta"), "{e}");
    assert_eq!(head_hash(&c, 0), before);
    // In bound in L2 but shaped to blow up: first moments where roots are zero.
    let n: usize = w0.values().map(|x| x.data.len()).sum();
    let per = 2.0 * clip / (n as f32).sqrt();
    let b = lease(&mut c, &key(1), 2);
    let body = with(per, 0.0);
    c.submit_update(&key(1), b.id, &body, None, claim(&key(1), &b, &body), 3)
        .unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 1);
    let next = lease(&mut c, &key(1), 4);
    let served = weights(&c, &key(1), &next);
    let (_, m) = moments::split(served);
    assert_eq!(m.len(), 2 * w0.len());
    for (name, x) in &m {
        assert!(
            x.data.iter().all(|&v| v == 0.0),
            "{name}: a first moment without a root is cut to zero"
        );
    }
}
