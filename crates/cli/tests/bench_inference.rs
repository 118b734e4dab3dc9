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

/// `--clients 1,2`: each system is run under 1 and 2 concurrent clients, and the JSON
/// reports each run's throughput and latency quantiles over exactly the requests made
/// (clients x requests per client; AR: one token latency per output byte). With
/// `--max-batch 1,4` BlockTrain is deployed twice, batching off and on, and its servers
/// report every timed request computed once per host (alone with batching off).
#[test]
fn bench_inference_concurrent_clients_count_every_request() {
    let dir = std::env::temp_dir().join(format!("bt-bench-clients-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let (reps, ar_reps, len) = (3, 2, 5);
    let out = Command::new(env!("CARGO_BIN_EXE_blocktrain"))
        .args(["bench", "inference", "--hosts", "loopback", "--link", "1ms"])
        .args(["--shape", "d=32,layers=1,heads=2,dtype=f32,window=32"])
        .args([
            "--lens",
            &len.to_string(),
            "--clients",
            "2",
            "--max-batch",
            "1,4",
        ])
        .args([
            "--reps",
            &reps.to_string(),
            "--ar-reps",
            &ar_reps.to_string(),
        ])
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
    // One client is always measured, before the ones asked for.
    assert_eq!(v["clients"], serde_json::json!([1, 2]), "{v}");
    assert_eq!(v["max_batch"], serde_json::json!([1, 4]), "{v}");
    let row = &v["rows"][0];
    for key in ["blocktrain@max_batch=1", "blocktrain@max_batch=4", "ar"] {
        assert!(row[key]["seconds"].as_f64().unwrap() > 0.0, "{key}: {row}");
    }
    assert_eq!(row["blocktrain@max_batch=4"]["max_batch"], 4, "{row}");
    let load = v["load"].as_array().expect("a load section");
    let mut seen = Vec::new();
    for entry in load {
        let system = entry["system"].as_str().unwrap();
        let max_batch = entry["max_batch"].as_u64();
        seen.push(format!("{system} {max_batch:?}"));
        let per_client = if system == "ar" { ar_reps } else { reps };
        let runs = entry["runs"].as_array().unwrap();
        let clients: Vec<u64> = runs
            .iter()
            .map(|r| r["clients"].as_u64().unwrap())
            .collect();
        assert_eq!(clients, [1, 2], "{entry}");
        for r in runs {
            let made = r["clients"].as_u64().unwrap() * per_client;
            let lat = &r["latency"];
            assert_eq!(r["requests"].as_u64(), Some(made), "{r}");
            assert_eq!(lat["count"].as_u64(), Some(made), "{r}");
            assert_eq!(r["latencies"].as_array().unwrap().len() as u64, made, "{r}");
            let (p50, p99) = (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap());
            assert!(0.0 < p50 && p50 <= p99, "{r}");
            let rps = r["requests_per_s"].as_f64().unwrap();
            let wall = r["wall_seconds"].as_f64().unwrap();
            assert!((rps * wall - made as f64).abs() < 1e-6, "{r}");
            // Each client kept its own connection to host 3: opened once, reused after.
            if system != "ar" {
                assert_eq!(
                    r["client_connections_opened"].as_u64(),
                    r["clients"].as_u64(),
                    "{r}"
                );
            }
            let traversals = r["traversals"].as_u64().unwrap();
            let batched = r["server_batched_requests"].as_u64().unwrap();
            match system {
                "ar" => {
                    assert_eq!(r["server_batches"], 0, "AR steps are not batched: {r}");
                    assert_eq!(traversals, made * len, "{r}");
                    let tok = &r["token_latency"];
                    assert_eq!(tok["count"].as_u64(), Some(made * len), "{r}");
                    assert!(tok["p50"].as_f64().unwrap() <= tok["p99"].as_f64().unwrap());
                }
                _ => {
                    assert_eq!(traversals, made, "one traversal per request: {r}");
                    assert!(r["token_latency"].is_null(), "{r}");
                    assert_eq!(batched, 3 * made, "each request once per host: {r}");
                    let mean = r["mean_batch"].as_f64().unwrap();
                    match max_batch {
                        Some(1) => assert_eq!(mean, 1.0, "batching off: {r}"),
                        _ => assert!((1.0..=2.0).contains(&mean), "{r}"),
                    }
                }
            }
        }
        let goal = &entry["goal"];
        assert!(goal["throughput_grows"].is_boolean(), "{goal}");
        assert!(
            goal["p99_within_3x_at_n4"].is_null(),
            "N = 4 not run: {goal}"
        );
    }
    seen.sort();
    assert_eq!(
        seen,
        ["ar None", "blocktrain Some(1)", "blocktrain Some(4)"]
    );
    assert!(
        text.contains("requests/s"),
        "the load table is printed: {text}"
    );
    assert!(
        text.contains("max batch 4 vs 1: requests/s x"),
        "batching on and off compared: {text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
