//! The ledger's offline tools: a read-only connection to a coordinator's state,
//! `verify_all` (every signature and tree head, naming the first bad entry) and the
//! per-worker `totals` payouts are computed from.
use super::*;

/// Opens `DIR/state.sqlite` read-only, for offline tools; errors say what is missing.
pub fn open_read_only(state_dir: &Path) -> Result<Connection> {
    if !state_dir.is_dir() {
        return Err(NodeError::Config(format!(
            "{}: no such state directory",
            state_dir.display()
        )));
    }
    let db = state_dir.join("state.sqlite");
    if !db.is_file() {
        return Err(NodeError::Config(format!(
            "{}: no coordinator database (is this a coordinator's --state directory?)",
            db.display()
        )));
    }
    let conn = Connection::open_with_flags(
        &db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let tables: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('ledger', 'tree_heads')",
        [],
        |r| r.get(0),
    )?;
    if tables != 2 {
        return Err(NodeError::Config(format!(
            "{}: no receipt ledger (written by a coordinator that keeps none?)",
            db.display()
        )));
    }
    Ok(conn)
}

/// What [`verify_all`] checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Receipts, all signatures valid.
    pub receipts: u64,
    /// Tree heads, each signed, matching the receipts and extending the one before.
    pub heads: u64,
    /// The coordinator that signed them (None for an empty ledger with no head).
    pub coordinator: Option<String>,
}

/// Checks one coordinator signed everything, adopting the first key seen.
fn same_coordinator(seen: &mut Option<String>, key: &str, what: &str) -> Result<()> {
    match seen {
        Some(k) if k != key => Err(bad(format!(
            "{what}: signed by coordinator {key}, the log's is {k}"
        ))),
        Some(_) => Ok(()),
        None => {
            *seen = Some(key.to_string());
            Ok(())
        }
    }
}

/// Checks one stored head against the tree of the first `head.size` receipts and the
/// head before it.
fn check_head(
    head: &TreeHead,
    tree: &Tree,
    prev: Option<&TreeHead>,
    coordinator: &mut Option<String>,
) -> Result<()> {
    let what = format!("tree head of size {}", head.size);
    head.verify()
        .map_err(|e| bad(format!("{what}: {}", detail(e))))?;
    same_coordinator(coordinator, &head.coordinator, &what)?;
    if head.root != hex::encode(tree.root().as_bytes()) {
        let from = prev.map_or(0, |p| p.size);
        return Err(bad(match head.size {
            0 => format!("{what}: root is not the empty log's"),
            s => format!(
                "ledger entries {from}..={}: changed, moved or replaced since {what} \
                 was signed (its root does not match)",
                s - 1
            ),
        }));
    }
    let Some(p) = prev else { return Ok(()) };
    let hashes = match p.size {
        0 => String::new(),
        _ => hex::encode(
            tree.prove_consistency((head.size - p.size) as usize)
                .as_bytes(),
        ),
    };
    let proof = ConsistencyProof {
        old_size: p.size,
        new_size: head.size,
        hashes,
    };
    verify_consistency(p, head, &proof).map_err(|e| {
        let size = p.size;
        bad(format!(
            "{what}: not an extension of the head of size {size}: {}",
            detail(e)
        ))
    })
}

/// Offline check of a whole ledger: every receipt's signatures, every stored tree head's
/// signature and root (recomputed from the receipts), and consistency of each head with
/// the previous one. Errors name the first bad entry (index, and which check failed).
///
/// Receipts are checked one by one, so a changed field names its entry; a receipt moved
/// or replaced by another validly signed one shows only in the roots, so the error names
/// the entries between the last matching head and the first one that does not match
/// (one entry when the coordinator signs a head after every append).
pub fn verify_all(conn: &Connection) -> Result<VerifyReport> {
    let heads = read_heads(conn)?;
    let mut pending = heads.iter().peekable();
    let mut tree = Tree::new();
    let mut coordinator = None;
    let mut prev: Option<&TreeHead> = None;
    let mut check_heads = |tree: &Tree, coordinator: &mut Option<String>| -> Result<()> {
        while let Some(head) = pending.next_if(|h| h.size == tree.len()) {
            check_head(head, tree, prev, coordinator)?;
            prev = Some(head);
        }
        Ok(())
    };
    check_heads(&tree, &mut coordinator)?;
    let receipts = read_entries(conn, |idx, r| {
        let what = format!("ledger entry {idx}");
        r.verify()
            .map_err(|e| bad(format!("{what}: {}", detail(e))))?;
        same_coordinator(&mut coordinator, &r.coordinator, &what)?;
        tree.push(r.leaf_bytes());
        check_heads(&tree, &mut coordinator)
    })?;
    if let Some(head) = heads.iter().find(|h| h.size > receipts) {
        return Err(bad(format!(
            "ledger entry {receipts}: missing (the tree head of size {} covers it, \
             the ledger ends before it)",
            head.size
        )));
    }
    Ok(VerifyReport {
        receipts,
        heads: heads.len() as u64,
        coordinator,
    })
}

/// One worker's totals for payouts: only figures the coordinator decided or measured
/// and signed. A claim's `data_bytes` is not among them: the worker declares it and
/// nothing checks it, so paying on it would pay for a number anyone can write (it stays
/// in each receipt, for `ledger export`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkerTotals {
    /// The worker's public key, hex.
    pub worker: String,
    /// Accepted updates.
    pub accepted: u64,
    /// Rejected updates.
    pub rejected: u64,
    /// Local steps of accepted updates (the steps the coordinator leased; acceptance is
    /// its judgement of the work).
    pub accepted_steps: i64,
    /// Sum of held-out improvement (before - after) over accepted updates that have both.
    pub heldout_gain: f64,
}

/// Per-worker totals over the whole ledger, by worker key. Each receipt's signatures are
/// checked first (an error names the entry): payouts count only what both sides signed.
pub fn totals(conn: &Connection) -> Result<Vec<WorkerTotals>> {
    let mut by_worker: BTreeMap<String, WorkerTotals> = BTreeMap::new();
    read_entries(conn, |idx, r| {
        r.verify()
            .map_err(|e| bad(format!("ledger entry {idx}: {}", detail(e))))?;
        let t = by_worker
            .entry(r.claim.worker.clone())
            .or_insert_with(|| WorkerTotals {
                worker: r.claim.worker.clone(),
                ..WorkerTotals::default()
            });
        if !r.decision.accepted {
            t.rejected += 1;
            return Ok(());
        }
        t.accepted += 1;
        t.accepted_steps = t.accepted_steps.saturating_add(r.claim.steps);
        if let (Some(before), Some(after)) = (r.decision.heldout_before, r.decision.heldout_after) {
            t.heldout_gain += before - after;
        }
        Ok(())
    })?;
    Ok(by_worker.into_values().collect())
}
