//! Operations: `doctor` and the seeded-fault `testnet`.
use super::harness::*;

#[test]
fn doctor_checks_the_coordinator_clock_and_reachability_and_names_failures() {
    let dir = scratch("doctor");
    let run = run_toml(&dir, 1, 1, 1, 1, "");
    let (_coord, url) = coordinator(&dir, free_port(), Some(&run));
    let port = free_port();
    let out = Command::new(BIN)
        .args(["doctor", "--coordinator", &url, "--dir"])
        .arg(&dir)
        .args(["--public-addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for check in ["memory", "disk", "coordinator", "clock", "public address"] {
        assert!(text.contains(&format!("ok    {check}")), "{check}: {text}");
    }
    // A coordinator that is not there, and an impossible disk demand: each named, exit 1.
    let out = Command::new(BIN)
        .args([
            "doctor",
            "--coordinator",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .args(["--min-disk-gb", "1000000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  coordinator") && text.contains("does not answer"),
        "{text}"
    );
    assert!(text.contains("FAIL  disk"), "{text}");
}

#[test]
fn testnet_trains_and_serves_under_seeded_faults_and_its_invariants_hold() {
    let dir = scratch("testnet");
    let json = dir.join("testnet.json");
    let out = Command::new(BIN)
        .args([
            "testnet",
            "--seed",
            "3",
            "--rounds",
            "3",
            "--requests",
            "6",
            "--device",
            "cpu",
        ])
        .arg("--out")
        .arg(dir.join("net"))
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all invariants hold"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let events = v["events"].as_array().unwrap();
    assert!(events.len() >= 3, "faults were injected: {events:?}");
    assert_eq!(v["inference"]["failed_unnamed"], 0);
    assert!(
        events
            .iter()
            .any(|e| e.as_str().unwrap().contains("connections were cut")),
        "{events:?}"
    );
}
