//! The training invariants `blocktrain testnet` checks on the state the coordinator left.
use std::path::Path;

use anyhow::Result;

use super::TestnetArgs;

/// The training invariants, checked on the state the coordinator left.
pub(super) fn check_training(
    state: &Path,
    args: &TestnetArgs,
    failures: &mut Vec<String>,
) -> Result<()> {
    let db = blocktrain_train::ledger::open_read_only(state)?;
    for block in 0..2i64 {
        let versions: Vec<i64> = db
            .prepare("SELECT version FROM versions WHERE block = ?1 ORDER BY version")?
            .query_map([block], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        let want: Vec<i64> = (0..=args.rounds as i64).collect();
        if versions != want {
            failures.push(format!(
                "block {}: versions {versions:?}, expected {want:?}",
                block + 1
            ));
        }
    }
    let merged: i64 = db.query_row("SELECT COALESCE(SUM(updates), 0) FROM versions", [], |r| {
        r.get(0)
    })?;
    let applied: i64 = db.query_row(
        "SELECT COUNT(*) FROM updates WHERE state = 'applied'",
        [],
        |r| r.get(0),
    )?;
    if merged != applied {
        failures.push(format!(
            "{applied} updates applied but versions record {merged} merged"
        ));
    }
    let pending_left: i64 = db.query_row(
        "SELECT COUNT(*) FROM updates u JOIN blocks b ON u.block = b.block WHERE u.state = 'pending' AND u.version < b.version",
        [],
        |r| r.get(0),
    )?;
    if pending_left > 0 {
        failures.push(format!(
            "{pending_left} accepted updates were never merged (lost)"
        ));
    }
    let unexplained: i64 = db.query_row(
        "SELECT COUNT(*) FROM updates WHERE state = 'rejected' AND (reason IS NULL OR reason = '')",
        [],
        |r| r.get(0),
    )?;
    if unexplained > 0 {
        failures.push(format!("{unexplained} rejections without a reason"));
    }
    if let Err(e) = blocktrain_train::ledger::verify_all(&db) {
        failures.push(format!("ledger: {e}"));
    }
    let run = blocktrain_model::run::RunDir::open(&state.join("model"))?;
    for part in 0..run.manifest.parts.len() {
        if let Err(e) = run.trained(part, tch::Device::Cpu) {
            failures.push(format!("block {} checkpoint does not load: {e}", part + 1));
        }
    }
    Ok(())
}
