//! `blocktrain bench attacks` at the tiny shape, 2 trials on the initial weights: the
//! verdicts that hold whatever the seed, and a JSON with every attacker.
use std::process::Command;

use serde_json::Value;

fn bench(name: &str, extra: &[&str]) -> Value {
    let json = std::env::temp_dir().join(format!("bt-attacks-{name}-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_blocktrain"))
        .args([
            "bench",
            "attacks",
            "--profile",
            "tiny",
            "--warm-rounds",
            "0",
            "--json",
        ])
        .arg(&json)
        .args(extra)
        .output()
        .expect("blocktrain runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    doc
}

fn row<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["attackers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["attacker"] == name)
        .unwrap_or_else(|| panic!("no row for {name}"))
}

#[test]
fn every_attacker_is_measured_and_the_sure_verdicts_hold() {
    let doc = bench("defaults", &["--trials", "2"]);
    assert_eq!(doc["shipped_trust_defaults"], true);
    assert_eq!(
        doc["mirror_mismatches"], 0,
        "the bench mirrors the screen and spot-check draw"
    );
    for name in [
        "honest",
        "flip",
        "noise",
        "x3",
        "other-data",
        "tuned",
        "zero",
    ] {
        let r = row(&doc, name);
        assert_eq!(r["n"], 2, "{name}");
        let c = &r["counts"];
        let total: u64 = [
            "refused_norm",
            "refused_screen",
            "flagged_spot_check",
            "refused_other",
            "accepted",
        ]
        .iter()
        .map(|k| c[k].as_u64().unwrap())
        .sum();
        assert_eq!(total, 2, "{name}: every upload has one verdict");
        assert_eq!(c["refused_other"], 0, "{name}: {}", r["other_reasons"]);
        // A recomputation tells every tampered upload from the honest one, and passes
        // the honest one (fp16's tolerance holds).
        let mismatches = if name == "honest" { 0 } else { 2 };
        assert_eq!(r["recomputation_mismatches"], mismatches, "{name}");
        let p = r["caught"]["p"].as_f64().unwrap();
        let within10 = r["caught"]["within"]["10"].as_f64().unwrap();
        assert!(
            (within10 - (1.0 - (1.0 - p).powi(10))).abs() < 1e-12,
            "{name}"
        );
    }
    // Credit for nothing and a scaled update never get in; honest work does.
    assert_eq!(row(&doc, "zero")["counts"]["refused_norm"], 2);
    assert_eq!(row(&doc, "x3")["counts"]["accepted"], 0);
    assert_eq!(row(&doc, "honest")["counts"]["accepted"], 2);
    // On the initial weights an honest step lowers the held-out loss a lot, so its
    // flip raises it far past the threshold.
    assert_eq!(row(&doc, "flip")["counts"]["refused_screen"], 2);
    assert_eq!(doc["uploads"].as_array().unwrap().len(), 14);
}

#[test]
fn a_sampled_spot_check_flags_other_data_and_passes_honest_work() {
    let doc = bench(
        "spot",
        &[
            "--trials",
            "1",
            "--attackers",
            "honest,other-data",
            "--spot-check-fraction",
            "1",
        ],
    );
    assert_eq!(doc["shipped_trust_defaults"], false);
    assert_eq!(row(&doc, "honest")["counts"]["accepted"], 1);
    assert_eq!(row(&doc, "other-data")["counts"]["flagged_spot_check"], 1);
    assert_eq!(row(&doc, "other-data")["barred"]["p"], 1.0);
}
