//! Malicious workers: refused with receipts, the model unchanged.
use super::harness::*;

/// Trains a 2-block tiny run to the end with two honest workers and the given extra
/// (malicious) workers; returns the state directory and the valid CE of the result.
fn trust_run(name: &str, attackers: &[&str]) -> (PathBuf, f64) {
    let dir = scratch(name);
    // fp32 updates (no error-feedback residue), one worker per block and round: the
    // honest trajectory does not depend on who else asked for work, so the attacked
    // run can be compared with the clean one. Every update is spot-checked.
    let run = run_toml(
        &dir,
        2,
        3,
        20,
        1,
        "[trust]\nspot_check_fraction = 1.0\nscreen_windows = 32\n[wire]\ncodec = \"fp32\"\n",
    );
    let (mut coord, url) = coordinator(&dir, free_port(), Some(&run));
    // The attackers go first, so each of them is scheduled and refused; then the honest
    // workers train the run. A failed spot check bars a worker at once (it exits with
    // an error); after any other refusal a worker backs off and asks again (an honest
    // one can be refused by mistake), so each attacker stops after three leases.
    for (i, m) in attackers.iter().enumerate() {
        let cache = dir.join(format!("cx{i}"));
        let name = format!("attacker-{i}");
        let mut bad = worker(
            &dir,
            &url,
            &name,
            &[
                "--malice",
                m,
                "--cache",
                cache.to_str().unwrap(),
                "--max-leases",
                "3",
            ],
        );
        wait_exit(&mut bad, Duration::from_secs(90));
        let log = read(&dir, &format!("{name}.log"));
        assert!(
            log.contains("update refused") && !log.contains("-> accepted"),
            "attacker {m} should have been refused every time:\n{log}"
        );
    }
    let mut honest = [
        worker(
            &dir,
            &url,
            "honest-a",
            &["--cache", dir.join("ca").to_str().unwrap()],
        ),
        worker(
            &dir,
            &url,
            "honest-b",
            &["--cache", dir.join("cb").to_str().unwrap()],
        ),
    ];
    for w in honest.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(120)).success());
    }
    assert!(wait_exit(&mut coord, Duration::from_secs(30)).success());
    let json = dir.join("eval.json");
    let out = Command::new(BIN)
        .args([
            "eval",
            "--split",
            "valid",
            "--max-windows",
            "300",
            "--samples",
            "1",
            "--seed",
            "1234",
            "--threads",
            "1",
        ])
        .arg("--checkpoint")
        .arg(dir.join("state/model"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let ce = v["results"][0]["report"]["nats"].as_f64().unwrap();
    (dir, ce)
}

#[test]
fn malicious_workers_are_refused_with_receipts_and_do_not_change_the_model() {
    let (_clean, clean_ce) = trust_run("trust-clean", &[]);
    let (dir, attacked_ce) = trust_run("trust-attacked", &["flip", "random", "scale:3"]);
    eprintln!("valid CE: {clean_ce:.5} clean, {attacked_ce:.5} with sign-flipping, random-noise and x3 workers");
    assert!(
        (attacked_ce - clean_ce).abs() < 0.01,
        "CE {attacked_ce} with attackers vs {clean_ce} without"
    );
    // The ledger holds a signed receipt for every decision and verifies offline.
    let state = dir.join("state");
    let out = Command::new(BIN)
        .args(["ledger", "verify", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = rusqlite::Connection::open(state.join("state.sqlite")).unwrap();
    let receipts: Vec<String> = db
        .prepare("SELECT receipt FROM ledger ORDER BY idx")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let keys: Vec<String> = ["attacker-0", "attacker-1", "attacker-2"]
        .iter()
        .map(|n| read(&dir, &format!("{n}.log")))
        .map(|log| {
            let at = log.find("(public ").expect("key line") + 8;
            log[at..at + 64].to_string()
        })
        .collect();
    let mut refused = vec![0; keys.len()];
    for r in &receipts {
        let v: serde_json::Value = serde_json::from_str(r).unwrap();
        if let Some(k) = keys.iter().position(|k| v["claim"]["worker"] == k.as_str()) {
            assert_eq!(v["decision"]["accepted"], false, "{v}");
            let reason = v["decision"]["reason"].as_str().unwrap();
            assert!(
                reason.contains("spot check")
                    || reason.contains("held-out screening")
                    || reason.contains("delta RMS")
                    // x3 of the moments' delta can pass the carried moments' bound
                    || reason.contains("optimizer-state delta"),
                "{reason}"
            );
            refused[k] += 1;
        }
    }
    // Every refusal an attacker was told of is on record; none was ever accepted.
    for (i, n) in refused.iter().enumerate() {
        let told = read(&dir, &format!("attacker-{i}.log"))
            .matches("update refused")
            .count();
        assert!(
            *n >= told && told >= 1,
            "attacker-{i}: {n} receipts, {told} refusals it was told of"
        );
    }
    // Each honest worker checked its own receipts' inclusion proofs at the end.
    for w in ["honest-a", "honest-b"] {
        let log = read(&dir, &format!("{w}.log"));
        assert!(log.contains("proven in the log of size"), "{log}");
    }
}
