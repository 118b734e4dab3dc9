//! `blocktrain ledger`: a coordinator's receipt ledger, offline. Verify it whole, prove
//! one receipt's inclusion in a self-contained file a worker checks alone, export the
//! receipts, and total them per worker for payouts. Reads the state database read-only,
//! so it is safe beside a running coordinator.
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use blocktrain_protocol::receipt::ReceiptProof;
use blocktrain_train::ledger::{self, open_read_only, Ledger, Log};
use clap::{Args, Subcommand};

/// Subcommands of `blocktrain ledger`.
#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Check every receipt's signatures and every tree head against the receipts.
    Verify(StateArgs),
    /// Write a self-contained proof that one receipt is in the log: the receipt, the
    /// latest signed tree head and the inclusion proof against it.
    Prove(ProveArgs),
    /// Check a proof file offline: receipt and head signatures, inclusion.
    CheckProof(CheckProofArgs),
    /// Every receipt as JSON lines: {"index": N, "receipt": {...}}.
    Export(ExportArgs),
    /// Per-worker totals for payouts: updates accepted and rejected, accepted steps,
    /// held-out improvement. Only what the coordinator checked: the data bytes a worker
    /// declares in its claims are unverified and left out (`ledger export` shows them).
    Totals(TotalsArgs),
}

/// Where the coordinator keeps its state.
#[derive(Args, Debug)]
pub struct StateArgs {
    /// The coordinator's --state directory (holding state.sqlite).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
}

/// Flags of `blocktrain ledger prove`.
#[derive(Args, Debug)]
pub struct ProveArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Index of the receipt in the log.
    #[arg(long, value_name = "ID")]
    pub receipt: u64,
    /// Write the proof here instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Flags of `blocktrain ledger check-proof`.
#[derive(Args, Debug)]
pub struct CheckProofArgs {
    /// A file written by `blocktrain ledger prove`.
    pub file: PathBuf,
    /// Also require this coordinator public key (hex) to have signed it.
    #[arg(long, value_name = "KEY")]
    pub coordinator: Option<String>,
}

/// Flags of `blocktrain ledger export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Write here instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Flags of `blocktrain ledger totals`.
#[derive(Args, Debug)]
pub struct TotalsArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `blocktrain ledger` subcommand.
pub fn run(cmd: LedgerCommand) -> Result<()> {
    match cmd {
        LedgerCommand::Verify(a) => println!("{}", verify(&a.state)?),
        LedgerCommand::Prove(a) => {
            let proof = prove(&a.state.state, a.receipt)?;
            let text = serde_json::to_string_pretty(&proof)? + "\n";
            write_out(a.out.as_deref(), text.as_bytes())?;
        }
        LedgerCommand::CheckProof(a) => {
            println!("{}", check_proof(&a.file, a.coordinator.as_deref())?)
        }
        LedgerCommand::Export(a) => {
            let conn = open_read_only(&a.state.state)?;
            let mut text = Vec::new();
            for (index, receipt) in Ledger::entries(&conn)? {
                serde_json::to_writer(
                    &mut text,
                    &serde_json::json!({ "index": index, "receipt": receipt }),
                )?;
                text.push(b'\n');
            }
            write_out(a.out.as_deref(), &text)?;
        }
        LedgerCommand::Totals(a) => print!("{}", totals(&a.state.state, a.json)?),
    }
    Ok(())
}

fn write_out(path: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match path {
        Some(p) => std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display())),
        None => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            out.write_all(bytes)?;
            Ok(out.flush()?)
        }
    }
}

fn verify(state: &Path) -> Result<String> {
    let conn = open_read_only(state)?;
    let report = ledger::verify_all(&conn).context("the ledger does not verify")?;
    Ok(format!(
        "ok: {} receipts, {} tree heads, coordinator {}",
        report.receipts,
        report.heads,
        report.coordinator.as_deref().unwrap_or("(none yet)")
    ))
}

fn prove(state: &Path, index: u64) -> Result<ReceiptProof> {
    let conn = open_read_only(state)?;
    let receipt = Ledger::receipt(&conn, index)?
        .with_context(|| format!("no receipt {index} in the ledger"))?;
    let head =
        Ledger::latest_head(&conn)?.context("the coordinator has signed no tree head yet")?;
    if index >= head.size {
        bail!(
            "receipt {index} is newer than the latest signed tree head ({} receipts): \
             try again once the coordinator signs the next one",
            head.size
        );
    }
    let proof = Log::load(&conn)?.prove_inclusion(index, head.size)?;
    let out = ReceiptProof {
        receipt,
        head,
        proof,
    };
    // Never hand out a proof that would not check (e.g. a tampered database).
    out.verify(None)
        .context("the ledger's own proof does not verify; run `blocktrain ledger verify`")?;
    Ok(out)
}

fn check_proof(file: &Path, coordinator: Option<&str>) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let p: ReceiptProof = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a receipt proof", file.display()))?;
    p.verify(coordinator)
        .with_context(|| format!("{}: does not verify", file.display()))?;
    let (r, d) = (&p.receipt, &p.receipt.decision);
    let verdict = match (d.accepted, &d.reason) {
        (true, _) => "accepted".to_string(),
        (false, Some(why)) => format!("rejected: {why}"),
        (false, None) => "rejected".to_string(),
    };
    Ok(format!(
        "ok: receipt {} (worker {}, lease {}, block {}, {verdict}) is in the log of {} \
         receipts signed by coordinator {} at {} ms",
        p.proof.index,
        r.claim.worker,
        r.claim.lease,
        r.claim.block,
        p.head.size,
        p.head.coordinator,
        p.head.time_ms
    ))
}

fn totals(state: &Path, json: bool) -> Result<String> {
    let conn = open_read_only(state)?;
    let rows = ledger::totals(&conn)?;
    if json {
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let mut out = format!(
        "{:<64} {:>8} {:>8} {:>12} {:>12}\n",
        "worker", "accepted", "rejected", "steps", "heldout_gain"
    );
    for t in rows {
        out += &format!(
            "{:<64} {:>8} {:>8} {:>12} {:>12.4}\n",
            t.worker, t.accepted, t.rejected, t.accepted_steps, t.heldout_gain
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use blocktrain_protocol::identity::Identity;
    use blocktrain_protocol::receipt::{Claim, Decision, Receipt, RECEIPT_VERSION};

    use super::*;

    /// A state directory with two receipts (one accepted, one rejected) and a head.
    fn state(name: &str) -> (PathBuf, Identity) {
        let dir = std::env::temp_dir().join(format!("bt-ledger-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (coord, worker) = (Identity::generate(), Identity::generate());
        let conn = rusqlite::Connection::open(dir.join("state.sqlite")).unwrap();
        // As the coordinator's store keeps it: read-only opens must cope with WAL.
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        let mut ledger = Ledger::open(&conn, coord.clone()).unwrap();
        for (lease, accepted) in [(1, true), (2, false)] {
            let claim = Claim {
                version: RECEIPT_VERSION,
                worker: worker.public_hex(),
                lease,
                block: 0,
                base_version: 0,
                update_blake3: "00".repeat(32),
                steps: 10,
                data_bytes: 100,
                local_loss: None,
            };
            let decision = Decision {
                accepted,
                reason: (!accepted).then(|| "stale".into()),
                resulting_version: None,
                heldout_before: Some(2.0),
                heldout_after: Some(1.5),
                time_ms: 5,
                staleness: 0,
            };
            let sig = claim.sign(&worker);
            ledger
                .append(&conn, &Receipt::issue(claim, Some(sig), decision, &coord))
                .unwrap();
        }
        ledger.sign_head(&conn, 7).unwrap();
        (dir, coord)
    }

    #[test]
    fn prove_then_check_and_sum() {
        let (dir, coord) = state("prove");
        assert!(verify(&dir)
            .unwrap()
            .starts_with("ok: 2 receipts, 1 tree heads"));
        let file = dir.join("proof.json");
        let proof = serde_json::to_string(&prove(&dir, 1).unwrap()).unwrap();
        std::fs::write(&file, proof).unwrap();
        let ok = check_proof(&file, Some(&coord.public_hex())).unwrap();
        assert!(ok.contains("rejected: stale"), "{ok}");
        let other = Identity::generate().public_hex();
        assert!(check_proof(&file, Some(&other)).is_err());
        assert!(prove(&dir, 2).is_err());
        let table = totals(&dir, false).unwrap();
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.contains("0.5000"), "{table}");
        // The claims declare 100 data bytes each, which nothing checks: no payout
        // figure may carry them, in the table or the JSON.
        assert!(
            !table.contains("data_bytes") && !table.contains(" 100 "),
            "{table}"
        );
        let json = totals(&dir, true).unwrap();
        assert!(!json.contains("data_bytes"), "{json}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_state_is_explained() {
        let err = verify(Path::new("/nonexistent/state")).unwrap_err();
        assert!(format!("{err:#}").contains("no such state directory"));
    }
}
