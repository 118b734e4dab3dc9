//! `blocktrain bench inference` end to end on loopback with a tiny tied shape: the depth
//! from `--total-layers` is split over the three hosts the same way for both systems, and
//! both systems run and are reported.
use std::process::Command;

#[test]
fn bench_inference_splits_a_tied_depth_over_the_hosts_for_both_systems() {
    let dir = std::env::temp_dir().join(format!("bt-bench-inference-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_blocktrain"))
        .args(["bench", "inference", "--hosts", "loopback", "--link", "1ms"])
        .args(["--shape", "d=32,layers=2,heads=2,dtype=f32,window=32,tie=2"])
        .args(["--total-layers", "5", "--lens", "6", "--reps", "1"])
        .args([
            "--steps-per-block",
            "2",
            "--prompt",
            "ab",
            "--device",
            "cpu",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("blocktrain runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // 5 = 1 + 2 + 2: hosts 3 and 2 (reached first) take the extra layer.
    assert_eq!(v["host_layers"], serde_json::json!([1, 2, 2]), "{v}");
    assert_eq!(
        (v["total_layers"].as_i64(), v["tie"].as_i64()),
        (Some(5), Some(2))
    );
    // Untied, 5 layers of d=32 (12d² + 2d each) plus embeddings, head and norm.
    let d = 32;
    let want = 5 * (12 * d * d + 2 * d) + 257 * d + d * 256 + d;
    assert_eq!(v["logical_params"].as_i64(), Some(want));
    assert!(v["weights"].as_str().unwrap().contains("tied"), "{v}");
    let row = &v["rows"][0];
    assert_eq!(row["blocktrain"]["traversals"], 1, "{row}");
    assert_eq!(
        row["ar"]["traversals"], 6,
        "one traversal per output byte: {row}"
    );
    for system in ["blocktrain", "ar"] {
        assert!(row[system]["seconds"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row[system]["bytes"].as_u64().unwrap() > 0, "{row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
