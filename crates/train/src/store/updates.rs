//! Updates (accepted, pending, refused) and the bytes each worker moved.
use super::*;

impl Store {
    /// Records an update (accepted or rejected); returns its id.
    pub fn insert_update(&self, u: &NewUpdate, now: u64) -> Result<i64> {
        insert_update(&self.conn, u, u.state, now)
    }

    /// Accepts an update in one transaction: its row (pending), its lease delivered, its
    /// bytes counted, the worker's signed claim `(json, signature)` and the held-out
    /// screening `(before, after)`. Returns the update id.
    pub fn accept_update(
        &mut self,
        u: &NewUpdate,
        claim: (&str, &str),
        screening: Option<(f64, f64)>,
        now: u64,
    ) -> Result<i64> {
        let tx = self.conn.transaction()?;
        let id = insert_update(&tx, u, update_state::PENDING, now)?;
        tx.execute(trust::CLAIM_ROW, params![id, claim.0, claim.1])?;
        if let Some((before, after)) = screening {
            tx.execute(trust::SCREENING_ROW, params![id, before, after])?;
        }
        tx.execute(
            "UPDATE leases SET state = 'delivered' WHERE id = ?1",
            [u.lease],
        )?;
        tx.execute(
            "INSERT INTO traffic (worker, block, up, down) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT(worker, block) DO UPDATE SET up = up + ?3",
            params![u.worker, u.block.map(|b| b as i64), u.bytes as i64],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// The accepted (pending or applied) update of a lease: (id, body hash).
    pub fn update_of_lease(&self, lease: i64) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, hash FROM updates WHERE lease = ?1 AND state != 'rejected'",
                [lease],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// How many versions after its base an update was accepted (0: fresh, or unknown).
    pub fn update_staleness(&self, id: i64) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT staleness FROM updates WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .unwrap_or(0) as u64)
    }

    /// Marks a pending update rejected (its body could not be read at merge time).
    pub fn reject_pending(&self, id: i64, reason: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE updates SET state = 'rejected', reason = ?2 WHERE id = ?1 AND state = 'pending'",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Removes the files of `block`'s versions older than `keep_from` (their rows stay,
    /// marked pruned); returns how many files went.
    pub fn prune_versions(&self, block: usize, keep_from: u64) -> Result<usize> {
        let mut st = self.conn.prepare(
            "SELECT weights, wire, momentum FROM versions WHERE block = ?1 AND version < ?2 AND pruned = 0",
        )?;
        let rows: Vec<(String, String, Option<String>)> = st
            .query_map(params![block as i64, keep_from as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        self.conn.execute(
            "UPDATE versions SET pruned = 1 WHERE block = ?1 AND version < ?2",
            params![block as i64, keep_from as i64],
        )?;
        let mut removed = 0;
        for (w, x, m) in rows {
            for h in [Some(w), Some(x), m].into_iter().flatten() {
                if !self.blob_referenced(&h)? && std::fs::remove_file(self.blob_path(&h)).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Whether any kept version or pending update still names blob `hash`.
    pub fn blob_referenced(&self, hash: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM versions WHERE pruned = 0 AND (weights = ?1 OR wire = ?1 OR momentum = ?1))
                 OR EXISTS (SELECT 1 FROM updates WHERE hash = ?1 AND state = 'pending')",
            [hash],
            |r| r.get(0),
        )?)
    }

    /// Pending updates of a block's round at `version` (stale ones, computed from an
    /// older version and accepted into this round, included), oldest first.
    pub fn pending(&self, block: usize, version: u64) -> Result<Vec<crate::core::Pending>> {
        let mut st = self.conn.prepare(
            "SELECT id, hash, steps, received_ms, lease, version FROM updates
             WHERE block = ?1 AND version + staleness = ?2 AND state = 'pending' ORDER BY id",
        )?;
        let rows = st.query_map(params![block as i64, version as i64], |r| {
            Ok(crate::core::Pending {
                update: r.get(0)?,
                hash: r.get(1)?,
                steps: r.get(2)?,
                received_ms: r.get::<_, i64>(3)? as u64,
                lease: r.get(4)?,
                base: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Most recent update records, newest first.
    pub fn recent_updates(&self, limit: usize) -> Result<Vec<UpdateRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, worker, block, version, bytes, state, reason, loss, staleness FROM updates ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(UpdateRecord {
                id: r.get(0)?,
                worker: r.get(1)?,
                block: r.get::<_, Option<i64>>(2)?.map(|b| b as usize),
                version: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                bytes: r.get::<_, i64>(4)? as u64,
                state: r.get(5)?,
                reason: r.get(6)?,
                loss: r.get(7)?,
                staleness: r.get::<_, i64>(8)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Update counts by state.
    pub fn update_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM updates GROUP BY state ORDER BY state")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Applied updates that were merged stale (staleness > 0, `[training] max_staleness`).
    pub fn stale_applied_count(&self) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM updates WHERE state = 'applied' AND staleness > 0",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Adds bytes moved for a worker on a block.
    pub fn add_traffic(&self, worker: &str, block: usize, up: u64, down: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO traffic (worker, block, up, down) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(worker, block) DO UPDATE SET up = up + ?3, down = down + ?4",
            params![worker, block as i64, up as i64, down as i64],
        )?;
        Ok(())
    }

    /// All traffic rows.
    pub fn traffic(&self) -> Result<Vec<Traffic>> {
        let mut st = self
            .conn
            .prepare("SELECT worker, block, up, down FROM traffic ORDER BY worker, block")?;
        let rows = st.query_map([], |r| {
            Ok(Traffic {
                worker: r.get(0)?,
                block: r.get::<_, i64>(1)? as usize,
                up: r.get::<_, i64>(2)? as u64,
                down: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn insert_update(conn: &Connection, u: &NewUpdate, state: &str, now: u64) -> Result<i64> {
    conn.execute(
        "INSERT INTO updates (lease, worker, block, version, bytes, hash, steps, loss, state, reason, received_ms, staleness)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            u.lease,
            u.worker,
            u.block.map(|b| b as i64),
            u.version.map(|v| v as i64),
            u.bytes as i64,
            u.hash,
            u.steps,
            u.loss,
            state,
            u.reason,
            now as i64,
            u.staleness as i64
        ],
    )?;
    Ok(conn.last_insert_rowid())
}
