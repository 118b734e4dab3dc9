//! A worker's own audit of the coordinator's ledger, trusting nothing the coordinator
//! says that it cannot prove:
//!
//! - the coordinator's key is the one this worker pinned on first contact;
//! - every receipt the coordinator lists for this worker is in its signed log
//!   (inclusion proofs), and the heads those proofs use are one log (consistency);
//! - the log only grew since the head this worker kept last time (consistency);
//! - every upload this worker made and recorded has a receipt. Refusals are receipted at
//!   once; an update taken into its round is receipted when the round closes, so one
//!   without a receipt counts as pending until the worker has seen its block move past
//!   the round it joined (a later lease or reply, a later receipt of its own, or the run
//!   being done), and as missing after that. The round it joined is the version it was
//!   trained from, or with the run's `max_staleness` K > 0 up to K later (a stale
//!   update): the one its reply named, or the one before when that reply came after a
//!   merge it completed. The record does not say which, so with K > 0 the audit waits
//!   for the block to pass the later of the two, and never more than K past the
//!   upload's base: a missing receipt of a fresh update merged at once is then found
//!   one version later than it could be;
//! - K itself is pinned: read from `GET /v1/run` (0 from a coordinator that does not
//!   say) and kept in the record on first contact, so a coordinator cannot widen it
//!   later. Every merged receipt of this worker's must name staleness s <= K and the
//!   version it made, base + s + 1: an update merged into another base than its
//!   receipt says, or further back than the run allows, fails the audit;
//! - the round a merged receipt names, base + s, is no later than the version the reply
//!   to that upload named (the round open when it was taken, or a later version). That
//!   bounds s from above only: a receipt naming an earlier round than the update joined,
//!   within K, cannot be told here from an honest one, since a reply may come after its
//!   round closed, or (re-sent) versions later.
use std::collections::BTreeMap;

use blocktrain_protocol::receipt::{
    verify_consistency, ConsistencyProof, Receipt, ReceiptProof, TreeHead,
};

use super::record::{Record, Upload};
use crate::client::Client;
use crate::{NodeError, Result};

/// What this worker saw of the run while it ran, beyond its own uploads: evidence of
/// which rounds have closed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Seen {
    /// Per block (0-based), the highest version seen in a lease.
    pub versions: BTreeMap<u32, u64>,
    /// The coordinator said the run is done: every round is closed.
    pub done: bool,
}

impl Seen {
    /// Notes that `block` has reached `version`.
    pub fn saw(&mut self, block: u32, version: u64) {
        let v = self.versions.entry(block).or_default();
        *v = (*v).max(version);
    }
}

/// What a worker's own audit of the ledger found.
#[derive(Clone, Debug, PartialEq)]
pub struct Audit {
    /// Its receipts whose inclusion proofs verified.
    pub receipts: usize,
    /// Of those, accepted.
    pub accepted: usize,
    /// Size of the tree head they were proven against (0: the ledger is empty).
    pub size: u64,
    /// Size of the earlier head this one was shown consistent with (None: first audit).
    pub consistent_with: Option<u64>,
    /// Uploads in this worker's record, each matched to its receipt or pending.
    pub uploads: usize,
    /// Of those, accepted into a round that has not visibly closed, without a receipt yet.
    pub pending: usize,
}

impl std::fmt::Display for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} receipt(s) of mine ({} accepted) proven in the log of size {}",
            self.receipts, self.accepted, self.size
        )?;
        match self.consistent_with {
            Some(old) => write!(f, "; the log extends the one of size {old} I saw before")?,
            None => write!(f, "; first head seen, kept for the next check")?,
        }
        write!(
            f,
            "; {} of my {} recorded upload(s) have their receipt",
            self.uploads - self.pending,
            self.uploads
        )?;
        if self.pending > 0 {
            write!(
                f,
                ", {} wait for their round to close (checked again next time)",
                self.pending
            )?;
        }
        Ok(())
    }
}

/// The run's `max_staleness`, as the coordinator announces it in `GET /v1/run` (0 when
/// it does not: a coordinator from before stale updates).
fn run_staleness(client: &mut Client) -> Result<u64> {
    match client.get_json::<serde_json::Value>("/v1/run") {
        Ok(info) => Ok(info["max_staleness"].as_u64().unwrap_or(0)),
        Err(NodeError::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// The run's `max_staleness`, read from the coordinator and pinned in the record the
/// first time an audit needs it (with a ledger head, or for an upload that may have joined
/// a later round), so one audit asks once and both uses check against the same K.
#[derive(Default)]
struct PinnedStaleness(Option<u64>);

impl PinnedStaleness {
    fn get(&mut self, record: &Record, client: &mut Client) -> Result<u64> {
        if let Some(k) = self.0 {
            return Ok(k);
        }
        let k = record.pin_staleness(run_staleness(client)?, client.base())?;
        Ok(*self.0.insert(k))
    }
}

/// The latest round accepted upload `u` may have joined, with `max_staleness` k: its
/// base version (k = 0), else the version its reply named, at most k past its base.
fn joined_round(u: &Upload, k: u64) -> u64 {
    let named = u.block_version.unwrap_or(u.base_version);
    named.clamp(u.base_version, u.base_version.saturating_add(k))
}

/// Checks that merged receipt `r` went into the round its staleness names, within the
/// run's pinned `max_staleness` `k`: a merged update from base b with staleness s
/// produced version b + s + 1, and s <= k.
fn merged_within(r: &Receipt, k: u64) -> Result<()> {
    let (base, s) = (r.claim.base_version, r.decision.staleness);
    let Some(v) = r.decision.resulting_version.filter(|_| r.decision.accepted) else {
        return Ok(());
    };
    let expected = base.checked_add(s).and_then(|x| x.checked_add(1));
    if s > k || expected != Some(v) {
        return Err(bad(format!(
            "a receipt says my update of block {} trained from version {base} was merged \
             into version {v} with staleness {s}, but the run's max_staleness is {k} and \
             staleness {s} from version {base} makes version {}",
            u64::from(r.claim.block) + 1,
            expected.map_or("(overflow)".to_string(), |e| e.to_string())
        )));
    }
    Ok(())
}

/// Checks that merged receipt `r` of upload `u` names a round no later than the version
/// the coordinator's reply to `u` named. An update joins the round open when it is taken
/// and a block's version only grows, so an honest reply, first or replayed, names that
/// round or a later version: a receipt placing the update in a later round than the
/// reply allowed says it was merged into another base than the one it joined.
fn joined_by_named(r: &Receipt, u: &Upload) -> Result<()> {
    let (Some(named), true) = (u.block_version, r.decision.accepted) else {
        return Ok(());
    };
    let joined = r.claim.base_version.saturating_add(r.decision.staleness);
    if joined > named {
        return Err(bad(format!(
            "a receipt says my update of block {} trained from version {} joined round \
             {joined} (staleness {}), but the reply to it said the block was at version \
             {named}",
            u64::from(r.claim.block) + 1,
            r.claim.base_version,
            r.decision.staleness
        )));
    }
    Ok(())
}

fn bad(m: String) -> NodeError {
    NodeError::Rejected(format!("ledger audit failed: {m}"))
}

/// Whether `r` is the receipt of `u`. Matched on the body's hash; the lease must agree
/// unless the coordinator wrote the claim itself without knowing the lease (-1).
fn receipt_of(r: &Receipt, u: &Upload) -> bool {
    r.claim.update_blake3 == u.update_blake3 && (r.claim.lease == u.lease || r.claim.lease == -1)
}

/// The highest version each block is known to have reached, from this worker's own
/// uploads, its receipts and what it saw while running.
fn reached(seen: &Seen, uploads: &[Upload], receipts: &[Receipt]) -> BTreeMap<u32, u64> {
    let mut at = seen.versions.clone();
    let mut saw = |block: u32, v: u64| {
        let e = at.entry(block).or_default();
        *e = (*e).max(v);
    };
    for u in uploads {
        saw(u.block, u.base_version.max(u.block_version.unwrap_or(0)));
    }
    for r in receipts {
        let v = r.claim.base_version;
        saw(
            r.claim.block,
            v.max(r.decision.resulting_version.unwrap_or(v)),
        );
    }
    at
}

/// Checks this worker's receipts, the log's growth and its uploads against the
/// coordinator's ledger (see the module doc); pins the coordinator's key on first
/// contact and keeps the newest head in `record`. A failed check is a
/// [`NodeError::Rejected`] starting "ledger audit failed"; network trouble comes back
/// as it is (the ledger was not checked, which is not the coordinator's fault).
pub fn audit_receipts(
    client: &mut Client,
    me: &str,
    record: &Record,
    seen: &Seen,
) -> Result<Audit> {
    let uploads = record.uploads()?;
    let kept = record.kept_head()?;
    let current: Option<TreeHead> = match client.get_json("/v1/ledger/head") {
        Ok(h) => Some(h),
        Err(NodeError::NotFound(_)) => None,
        Err(e) => return Err(e),
    };
    let mut receipts = Vec::new();
    let mut head = None;
    let mut max_staleness = PinnedStaleness::default();
    if let Some(current) = current {
        current
            .verify()
            .map_err(|e| bad(format!("tree head: {e}")))?;
        record.pin(&current.coordinator, client.base())?;
        let k = max_staleness.get(record, client)?;
        let (mine, heads) = proven_receipts(client, me, &current.coordinator)?;
        for r in &mine {
            merged_within(r, k)?;
        }
        receipts = mine;
        // The newest head seen; every other head a proof used must be a prefix of it,
        // or the coordinator showed this worker's receipts in different logs.
        let newest = heads
            .iter()
            .chain([&current])
            .max_by_key(|h| h.size)
            .expect("one head at least")
            .clone();
        for h in heads.iter().filter(|h| **h != newest) {
            extends(client, h, &newest)?;
        }
        head = Some(newest);
    }
    let consistent_with = match (&kept, &head) {
        (Some(old), Some(new)) => {
            extends(client, old, new)?;
            Some(old.size)
        }
        (Some(old), None) => {
            return Err(bad(format!(
            "the coordinator serves no tree head, but its log had {} entries when I last checked",
            old.size
        )))
        }
        (None, _) => None,
    };
    if let Some(h) = &head {
        record.keep_head(h)?;
    }
    let at = reached(seen, &uploads, &receipts);
    let mut missing = Vec::new();
    let mut pending = 0;
    for u in &uploads {
        let mut matched = false;
        for r in receipts.iter().filter(|r| receipt_of(r, u)) {
            joined_by_named(r, u)?;
            matched = true;
        }
        if matched {
            continue;
        }
        // Only an accepted upload whose reply named a later version than its base may
        // have joined a later round, and that matters only once the block passed its base.
        let later = u.accepted
            && u.block_version.is_some_and(|v| v > u.base_version)
            && at.get(&u.block).is_some_and(|&v| v > u.base_version);
        let joined = match later {
            true => joined_round(u, max_staleness.get(record, client)?),
            false => u.base_version,
        };
        let closed = seen.done || at.get(&u.block).is_some_and(|&v| v > joined);
        if u.accepted && !closed {
            pending += 1;
        } else {
            missing.push(u);
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|u| describe(u)).collect();
        return Err(bad(format!(
            "the coordinator's ledger has no receipt for {} of my uploads, though each \
             should have one by now: {}",
            missing.len(),
            list.join("; ")
        )));
    }
    Ok(Audit {
        receipts: receipts.len(),
        accepted: receipts.iter().filter(|r| r.decision.accepted).count(),
        size: head.map_or(0, |h| h.size),
        consistent_with,
        uploads: uploads.len(),
        pending,
    })
}

/// Every receipt the coordinator lists for `me`, each checked against its inclusion
/// proof and signed by `coordinator`, with the heads the proofs used.
fn proven_receipts(
    client: &mut Client,
    me: &str,
    coordinator: &str,
) -> Result<(Vec<Receipt>, Vec<TreeHead>)> {
    // The listing comes in pages, oldest first; `next` is the cursor of the next one.
    let mut indices: Vec<u64> = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/ledger/receipts?worker={me}&limit=1000&after={a}"),
            None => format!("/v1/ledger/receipts?worker={me}&limit=1000"),
        };
        let listed: serde_json::Value = client.get_json(&path)?;
        indices.extend(
            listed["receipts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["index"].as_u64()),
        );
        match listed["next"].as_u64() {
            Some(n) if after.is_none_or(|a| n > a) => after = Some(n),
            _ => break,
        }
    }
    let mut receipts = Vec::with_capacity(indices.len());
    let mut heads: Vec<TreeHead> = Vec::new();
    for i in &indices {
        let p: ReceiptProof = client.get_json(&format!("/v1/ledger/receipts/{i}"))?;
        p.verify(Some(coordinator))
            .map_err(|e| bad(format!("receipt {i}: {e}")))?;
        if p.proof.index != *i {
            return Err(bad(format!(
                "asked for receipt {i}, got the proof of entry {}",
                p.proof.index
            )));
        }
        if p.receipt.claim.worker != me {
            return Err(bad(format!("receipt {i} is not this worker's")));
        }
        if !heads.contains(&p.head) {
            heads.push(p.head);
        }
        receipts.push(p.receipt);
    }
    Ok((receipts, heads))
}

/// Checks, with the coordinator's consistency proof, that `new`'s log extends `old`'s.
fn extends(client: &mut Client, old: &TreeHead, new: &TreeHead) -> Result<()> {
    if old.size > new.size {
        return Err(bad(format!(
            "the log shrank from {} to {} entries",
            old.size, new.size
        )));
    }
    if old.size == new.size {
        // Nothing to prove: one log of this size has one root.
        return match (old.root == new.root, old.coordinator == new.coordinator) {
            (true, true) => Ok(()),
            _ => Err(bad(format!(
                "two different signed heads of a log of {} entries",
                new.size
            ))),
        };
    }
    let proof: ConsistencyProof = client.get_json(&format!(
        "/v1/ledger/consistency?from={}&to={}",
        old.size, new.size
    ))?;
    verify_consistency(old, new, &proof).map_err(|e| {
        bad(format!(
            "the log of size {} does not extend the one of size {} seen before: {e}",
            new.size, old.size
        ))
    })
}

fn describe(u: &Upload) -> String {
    let hash: String = u.update_blake3.chars().take(16).collect();
    let id = u
        .update_id
        .map_or(String::new(), |id| format!(", update id {id}"));
    let what = match (&u.reason, u.accepted) {
        (_, true) => "accepted into its round".to_string(),
        (Some(why), false) => format!("refused: {why}"),
        (None, false) => "refused".to_string(),
    };
    format!(
        "lease {} (block {} v{}, body {hash}{id}, {what})",
        u.lease,
        u64::from(u.block) + 1,
        u.base_version
    )
}
