//! What `blocktrain bench attacks` found: per attacker, how its uploads ended, the
//! per-upload probability of being caught (refused or flagged) and of being barred
//! (flagged by a spot check: the only verdict that ends a worker's run), with binomial
//! standard errors and Wilson 95% intervals, and the chance of either within k uploads.
use blocktrain_train::config::RunConfig;
use serde_json::{json, Value};

use crate::cmd::bench_attacks::BenchAttacksArgs;

/// How the coordinator answered one upload.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Accepted (it will be merged, and credited).
    Accepted,
    /// Refused by the norm checks: a tensor beyond `max_delta_ratio`, or an empty update.
    Norm,
    /// Refused by the held-out screen.
    Screen,
    /// Refused by a spot check, and the worker barred.
    Flagged,
    /// Refused for another reason (should not happen here; the reason is kept).
    Other(String),
}

impl Outcome {
    fn name(&self) -> &str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Norm => "norm",
            Outcome::Screen => "screen",
            Outcome::Flagged => "flagged",
            Outcome::Other(_) => "other",
        }
    }
}

/// One upload and what the bench knew about it.
#[derive(Clone, Debug)]
pub struct Upload {
    /// Trial (run) index.
    pub trial: usize,
    /// Attacker name.
    pub attacker: String,
    /// Block and version the lease was for.
    pub block: usize,
    /// Version of the block the lease trained from.
    pub version: u64,
    /// The coordinator's verdict.
    pub outcome: Outcome,
    /// Whether the lease was in the coordinator's spot-check sample.
    pub sampled: bool,
    /// Relative error of the upload against its recomputation (the honest delta).
    pub rel_error: f64,
    /// Whether that error exceeds the codec's spot-check tolerance.
    pub would_flag: bool,
    /// Held-out change of the upload alone on the coordinator's secret screen.
    pub change: f64,
    /// The screen's threshold when it was uploaded.
    pub threshold: f64,
    /// Tuned attacker only: the scale it chose and its own proxy's change at it.
    pub scale: Option<f64>,
    /// Tuned attacker only: the proxy's change at the chosen scale.
    pub proxy_change: Option<f64>,
}

/// Spot-check fractions the modelled detection probability is given at.
const FRACTIONS: [f64; 5] = [0.05, 0.1, 0.2, 0.3, 0.5];
/// Upload counts the "within k" probabilities are given at.
const KS: [i32; 3] = [1, 10, 100];

/// [`FRACTIONS`], and the run's own fraction if it is not one of them.
fn fractions(own: f64) -> Vec<f64> {
    let mut v = FRACTIONS.to_vec();
    if !v.contains(&own) {
        v.push(own);
    }
    v
}

/// p, its binomial standard error and Wilson 95% interval, for `x` of `n`.
fn rate(x: usize, n: usize) -> Value {
    let (x, n) = (x as f64, n.max(1) as f64);
    let p = x / n;
    let z = 1.96f64;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    json!({
        "p": p, "se": (p * (1.0 - p) / n).sqrt(),
        "wilson95": [(centre - half).max(0.0), (centre + half).min(1.0)],
        "within": KS.iter().map(|&k| (k.to_string(), json!(1.0 - (1.0 - p).powi(k)))).collect::<serde_json::Map<_, _>>(),
    })
}

fn stats(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
    json!({
        "mean": s.iter().sum::<f64>() / s.len() as f64,
        "min": s[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": s[s.len() - 1],
    })
}

/// One attacker's row.
fn summarize(name: &str, ups: &[&Upload], fraction: f64) -> Value {
    let n = ups.len();
    let count = |o: &str| ups.iter().filter(|u| u.outcome.name() == o).count();
    let (accepted, norm, screen, flagged, other) = (
        count("accepted"),
        count("norm"),
        count("screen"),
        count("flagged"),
        count("other"),
    );
    // Past the norm checks and the screen, only a sampled spot check stands between an
    // upload and the merge; `power` is how often a recomputation catches one.
    let passed: Vec<&&Upload> = ups
        .iter()
        .filter(|u| matches!(u.outcome, Outcome::Accepted | Outcome::Flagged))
        .collect();
    let power = passed.iter().filter(|u| u.would_flag).count() as f64 / passed.len().max(1) as f64;
    let pre = (norm + screen + other) as f64 / n.max(1) as f64;
    let pass = passed.len() as f64 / n.max(1) as f64;
    let modelled = |f: f64| json!({"spot_check_fraction": f, "p_caught": pre + pass * f * power, "p_barred": pass * f * power});
    let changes: Vec<f64> = ups.iter().map(|u| u.change).collect();
    let accepted_changes: Vec<f64> = ups
        .iter()
        .filter(|u| u.outcome == Outcome::Accepted)
        .map(|u| u.change)
        .collect();
    let others: Vec<&str> = ups
        .iter()
        .filter_map(|u| match &u.outcome {
            Outcome::Other(m) => Some(m.as_str()),
            _ => None,
        })
        .collect();
    json!({
        "attacker": name, "n": n,
        "counts": {"refused_norm": norm, "refused_screen": screen, "flagged_spot_check": flagged, "refused_other": other, "accepted": accepted},
        "fractions": {
            "refused_norm": norm as f64 / n as f64, "refused_screen": screen as f64 / n as f64,
            "flagged_spot_check": flagged as f64 / n as f64, "accepted": accepted as f64 / n as f64,
        },
        "caught": rate(n - accepted, n),
        "barred": rate(flagged, n),
        "sampled_for_spot_check": ups.iter().filter(|u| u.sampled).count(),
        "recomputation_mismatches": ups.iter().filter(|u| u.would_flag).count(),
        "spot_check_power": power,
        "modelled": fractions(fraction).into_iter().map(modelled).collect::<Vec<_>>(),
        "rel_error": stats(&ups.iter().map(|u| u.rel_error).collect::<Vec<_>>()),
        "heldout_change": stats(&changes),
        "heldout_change_accepted": stats(&accepted_changes),
        "threshold": stats(&ups.iter().map(|u| u.threshold).collect::<Vec<_>>()),
        "tuned_scale": stats(&ups.iter().filter_map(|u| u.scale).collect::<Vec<_>>()),
        "tuned_proxy_change": stats(&ups.iter().filter_map(|u| u.proxy_change).collect::<Vec<_>>()),
        "other_reasons": others,
    })
}

/// Uploads whose verdict the bench's mirror of the coordinator (its rebuilt screen and
/// spot-check draw) does not explain: nonzero means the mirror, and with it the
/// modelled numbers, is out of date.
fn mirror_mismatches(ups: &[Upload]) -> usize {
    ups.iter()
        .filter(|u| match u.outcome {
            Outcome::Screen => u.change <= u.threshold,
            Outcome::Flagged => !(u.sampled && u.would_flag) || u.change > u.threshold,
            Outcome::Accepted => (u.sampled && u.would_flag) || u.change > u.threshold,
            _ => false,
        })
        .count()
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |p| format!("{:.1}%", 100.0 * p))
}

/// Prints the table and returns the JSON document.
pub fn report(
    args: &BenchAttacksArgs,
    cfg: &RunConfig,
    ups: &[Upload],
    warm_refused: usize,
    secs: f64,
) -> Value {
    let mut names: Vec<String> = Vec::new();
    for u in ups {
        if !names.contains(&u.attacker) {
            names.push(u.attacker.clone());
        }
    }
    let fraction = cfg.trust.spot_check_fraction;
    let rows: Vec<Value> = names
        .iter()
        .map(|n| {
            summarize(
                n,
                &ups.iter().filter(|u| &u.attacker == n).collect::<Vec<_>>(),
                fraction,
            )
        })
        .collect();
    let mismatches = mirror_mismatches(ups);
    let m = &cfg.model;
    let shipped = RunConfig::default();
    let defaults = cfg.trust == shipped.trust && cfg.wire == shipped.wire;
    println!(
        "\nattacks: {} trials, {:?} blocks d {} x {} layer(s), window {}, {} honest warm rounds; screen {} windows, threshold {}, spot checks {}, codec {} ({})",
        args.trials, args.profile, m.d_model, m.n_layers, m.window, args.warm_rounds,
        cfg.trust.screen_windows, cfg.trust.screen_threshold, fraction, cfg.wire.codec,
        if defaults { "the shipped defaults" } else { "NOT the shipped defaults" }
    );
    println!("| attacker | n | refused: norm/empty | refused: screen | flagged: spot check | accepted | p(caught) per upload ± se | 95% CI | caught within 10 | within 100 | p(barred) ± se | barred within 10 | within 100 | held-out change, median (max) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let f = &r["fractions"];
        let (c, b) = (&r["caught"], &r["barred"]);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} ± {} | {}-{} | {} | {} | {} ± {} | {} | {} | {:+.4} ({:+.4}) |",
            r["attacker"].as_str().unwrap_or("?"), r["n"],
            pct(&f["refused_norm"]), pct(&f["refused_screen"]), pct(&f["flagged_spot_check"]), pct(&f["accepted"]),
            pct(&c["p"]), pct(&c["se"]), pct(&c["wilson95"][0]), pct(&c["wilson95"][1]), pct(&c["within"]["10"]), pct(&c["within"]["100"]),
            pct(&b["p"]), pct(&b["se"]), pct(&b["within"]["10"]), pct(&b["within"]["100"]),
            r["heldout_change"]["median"].as_f64().unwrap_or(f64::NAN),
            r["heldout_change"]["max"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!("\nmodelled p(caught) per upload from the refusals seen and the recomputation mismatch rate, at other spot-check fractions:");
    println!(
        "| attacker | recomputation mismatches | {} |",
        FRACTIONS.map(|f| format!("f = {f}")).join(" | ")
    );
    println!("|---|---:|{}", "---:|".repeat(FRACTIONS.len()));
    for r in &rows {
        let cells: Vec<String> = r["modelled"]
            .as_array()
            .into_iter()
            .flatten()
            .take(FRACTIONS.len())
            .map(|x| pct(&x["p_caught"]))
            .collect();
        println!(
            "| {} | {}/{} | {} |",
            r["attacker"].as_str().unwrap_or("?"),
            r["recomputation_mismatches"],
            r["n"],
            cells.join(" | ")
        );
    }
    if mismatches > 0 {
        eprintln!("WARNING: {mismatches} verdict(s) the bench's mirror of the screen or spot-check draw does not explain; the modelled numbers are suspect");
    }
    if warm_refused > 0 {
        println!("honest warm-up uploads refused: {warm_refused}");
    }
    println!("wall time {secs:.0} s");
    json!({
        "bench": "attacks",
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "trials": args.trials, "seed": args.seed, "warm_rounds": args.warm_rounds,
        "profile": format!("{:?}", args.profile).to_lowercase(),
        "threads": tch::get_num_threads(),
        "config": serde_json::to_value(cfg).unwrap_or(Value::Null),
        "shipped_trust_defaults": defaults,
        "honest_warm_uploads_refused": warm_refused,
        "mirror_mismatches": mismatches,
        "seconds": secs,
        "attackers": rows,
        "uploads": ups.iter().map(|u| json!({
            "trial": u.trial, "attacker": u.attacker, "block": u.block, "version": u.version,
            "outcome": u.outcome.name(), "reason": match &u.outcome { Outcome::Other(m) => Some(m), _ => None },
            "sampled": u.sampled, "rel_error": u.rel_error, "would_flag": u.would_flag,
            "heldout_change": u.change, "threshold": u.threshold, "scale": u.scale, "proxy_change": u.proxy_change,
        })).collect::<Vec<_>>(),
    })
}
