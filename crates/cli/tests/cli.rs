//! The `blocktrain` binary as a user runs it: tiny profiles, real processes.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bt(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blocktrain"));
    cmd.args(args);
    if !args.contains(&"--device") && !args.contains(&"sideways") {
        cmd.args(["--device", "cpu"]);
    }
    cmd.output().expect("blocktrain runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts the command succeeded; returns its output text.
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    text(o)
}

/// Asserts the command failed with a message containing `needle`.
fn fails_with(o: &Output, needle: &str) {
    assert!(
        !o.status.success() && text(o).contains(needle),
        "expected failure naming '{needle}': {}",
        text(o)
    );
}

/// The first file in `dir` whose name contains `needle`.
fn file_in(dir: &Path, needle: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(needle))
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bt-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `eval` of the run in `out` on 16 valid windows, JSON to `out/e.json`, plus `extra`.
fn eval_valid(out: &Path, extra: &[&str]) -> Output {
    let json = out.join("e.json");
    let mut args = vec![
        "eval",
        "--checkpoint",
        out.to_str().unwrap(),
        "--split",
        "valid",
        "--max-windows",
        "16",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bt(&args)
}

fn train_tiny(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--profile",
        "tiny",
        "--steps",
        "6",
        "--data",
        "shakespeare",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bt(&args)
}

#[test]
fn train_eval_generate_round_trip() {
    let out = scratch("rt");
    let o = train_tiny(&out, &["--blocks", "2"]);
    ok(&o);
    let o = eval_valid(&out, &[]);
    ok(&o);
    let t = text(&o);
    assert!(
        t.contains("block 2 t [0.500, 1.000]") && t.contains("total ELBO"),
        "{t}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("e.json")).unwrap()).unwrap();
    let nats = json["results"][0]["report"]["nats"].as_f64().unwrap();
    assert!(nats > 0.5 && nats < 6.0, "held-out ELBO {nats}");
    let o = bt(&[
        "generate",
        "--checkpoint",
        out.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--len",
        "20",
        "--steps-per-block",
        "3",
    ]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ROMEO:"));
    let o = bt(&[
        "eval",
        "--checkpoint",
        out.to_str().unwrap(),
        "--samples",
        "0",
    ]);
    fails_with(&o, "--samples");
    // Training again on top of a finished run is refused; --resume finds nothing left to do.
    let o = train_tiny(&out, &["--blocks", "2"]);
    fails_with(&o, "--resume");
    let o = train_tiny(&out, &["--resume"]);
    assert!(
        o.status.success() && text(&o).contains("already trained"),
        "{}",
        text(&o)
    );
}

#[test]
fn one_block_trains_alone_and_eval_names_the_missing_ones() {
    let out = scratch("one");
    let o = train_tiny(&out, &["--blocks", "3", "--block", "2"]);
    ok(&o);
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let steps: Vec<i64> = run["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["steps_done"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 6, 0]);
    let o = bt(&[
        "eval",
        "--checkpoint",
        out.to_str().unwrap(),
        "--max-windows",
        "4",
    ]);
    assert!(
        !o.status.success()
            && text(&o).contains("block-1")
            && text(&o).contains("not been trained"),
        "{}",
        text(&o)
    );
}

#[test]
fn references_train_with_matching_budget() {
    for obj in ["e2e", "ar"] {
        let out = scratch(obj);
        let o = train_tiny(&out, &["--objective", obj, "--blocks", "2"]);
        ok(&o);
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(
            run["model"]["n_layers"], 2,
            "{obj} gets B x the layers of one block"
        );
        let o = bt(&[
            "eval",
            "--checkpoint",
            out.to_str().unwrap(),
            "--split",
            "test",
            "--max-windows",
            "8",
        ]);
        ok(&o);
        let want = if obj == "ar" { "exact NLL" } else { "ELBO" };
        assert!(text(&o).contains(want), "{}", text(&o));
    }
}

#[test]
fn blocks_can_have_their_own_depth() {
    let out = scratch("depth");
    let o = train_tiny(&out, &["--blocks", "3", "--block-layers", "2,1,1"]);
    ok(&o);
    let weights: Vec<u64> = (1..=3)
        .map(|b| {
            std::fs::metadata(file_in(&out, &format!("block-{b}.weights.")))
                .unwrap()
                .len()
        })
        .collect();
    assert!(
        weights[0] > weights[1] && weights[1] == weights[2],
        "{weights:?}"
    );
    let o = bt(&[
        "eval",
        "--checkpoint",
        out.to_str().unwrap(),
        "--max-windows",
        "4",
    ]);
    ok(&o);
    let o = train_tiny(
        &scratch("depth-bad"),
        &["--blocks", "3", "--block-layers", "2,1"],
    );
    fails_with(&o, "3 positive counts");
}

#[test]
fn bad_input_gets_clear_errors() {
    let missing = scratch("missing");
    let o = bt(&["eval", "--checkpoint", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no checkpoint"), "{}", text(&o));

    let o = bt(&["train", "--objective", "sideways", "--out", "x"]);
    assert_eq!(o.status.code(), Some(2), "clap rejects unknown values");

    let out = scratch("bounds");
    let o = train_tiny(&out, &["--blocks", "3", "--boundaries", "0,0.5,1"]);
    fails_with(&o, "2 intervals");
    let o = train_tiny(&out, &["--blocks", "2", "--boundaries", "0,0.7,0.2,1"]);
    fails_with(&o, "rise strictly");

    let o = train_tiny(&scratch("cfg"), &["--d-model", "30", "--heads", "4"]);
    fails_with(&o, "heads");

    let o = train_tiny(&scratch("gpu"), &["--device", "cuda:7"]);
    fails_with(&o, "cuda:7");

    // A flipped byte in a stored checkpoint is caught by its content hash.
    let out = scratch("corrupt");
    assert!(train_tiny(&out, &["--blocks", "1"]).status.success());
    let weights = file_in(&out, ".weights.");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let o = bt(&[
        "generate",
        "--checkpoint",
        out.to_str().unwrap(),
        "--len",
        "4",
    ]);
    fails_with(&o, "blake3");
}

#[test]
fn demo_runs_end_to_end_on_the_tiny_profile_and_reruns() {
    let out = scratch("demo");
    for _ in 0..2 {
        let o = bt(&[
            "demo",
            "--profile",
            "tiny",
            "--out",
            out.to_str().unwrap(),
            "--len",
            "16",
        ]);
        ok(&o);
        let t = text(&o);
        assert!(t.contains("total ELBO") && t.contains("3/3 sample"), "{t}");
    }
}

/// The paper's family as a user runs it: train, evaluate (bound, paper CE, CE against
/// sigma, JSON), sample with Euler and Heun, and a demo over HTTP.
#[test]
fn edm_train_eval_generate_and_demo() {
    let out = scratch("edm");
    ok(&train_tiny(
        &out,
        &["--objective", "edm", "--blocks", "2", "--embed-dim", "8"],
    ));
    let t = ok(&eval_valid(&out, &["--curve", "3"]));
    assert!(
        t.contains("block 2 sigma [1.623, 10.000]")
            && t.contains("VDM bound")
            && t.contains("CE against sigma"),
        "{t}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("e.json")).unwrap()).unwrap();
    let report = &json["results"][0]["report"];
    let terms = &report["terms"];
    let sum = terms["prior"]["nats"].as_f64().unwrap()
        + terms["diffusion"]["nats"].as_f64().unwrap()
        + terms["reconstruction"]["nats"].as_f64().unwrap();
    assert!(
        (sum - report["nats"].as_f64().unwrap()).abs() < 1e-9,
        "{report}"
    );
    assert_eq!(json["results"][0]["curve"].as_array().unwrap().len(), 3);
    for extra in [&[][..], &["--heun"][..]] {
        let mut args = vec![
            "generate",
            "--checkpoint",
            out.to_str().unwrap(),
            "--prompt",
            "ROMEO:",
            "--len",
            "12",
            "--steps-per-block",
            "3",
        ];
        args.extend_from_slice(extra);
        let g = ok(&bt(&args));
        assert!(g.starts_with("ROMEO:"), "{g}");
    }
    // EDM flags belong to the edm family only.
    fails_with(
        &train_tiny(&scratch("edm-bad"), &["--embed-dim", "8"]),
        "--objective edm",
    );
    let demo = scratch("edm-demo");
    let o = bt(&[
        "demo",
        "--profile",
        "tiny",
        "--objective",
        "edm",
        "--blocks",
        "2",
        "--workers",
        "2",
        "--out",
        demo.to_str().unwrap(),
        "--len",
        "16",
    ]);
    let t = ok(&o);
    assert!(t.contains("VDM bound") && t.contains("3/3 sample"), "{t}");
}
