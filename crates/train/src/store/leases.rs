//! Leases: issue, renewal, lapse, slots and their seeds' history.
use super::*;

impl Store {
    /// Journals an issued lease and remembers the worker's block.
    pub fn insert_lease(&self, l: &LeaseRow) -> Result<()> {
        self.conn.prepare_cached(
            "INSERT INTO leases (id, worker, block, version, slot, steps, seed, issued_ms, expires_ms, state, public)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?.execute(params![
            l.id,
            l.worker,
            l.block as i64,
            l.version as i64,
            l.slot,
            l.steps,
            l.seed as i64,
            l.issued_ms as i64,
            l.expires_ms as i64,
            l.state,
            l.public
        ])?;
        self.conn
            .prepare_cached("UPDATE workers SET last_block = ?2 WHERE key = ?1")?
            .execute(params![l.worker, l.block as i64])?;
        Ok(())
    }

    /// Removes a lease the core issued but could not journal whole (its reply never
    /// went out).
    pub fn delete_lease(&self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM leases WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Writes the core's soft state (renewals, lapses, last contact) in one transaction.
    pub fn write_soft(&mut self, soft: &crate::core::Soft) -> Result<()> {
        if soft.leases.is_empty() && soft.workers.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut lease = tx.prepare_cached(
                "UPDATE leases SET state = ?2, expires_ms = ?3 WHERE id = ?1
                 AND state IN ('active', 'expired')",
            )?;
            for (id, state, expires) in &soft.leases {
                lease.execute(params![id, state, *expires as i64])?;
            }
            let mut worker = tx.prepare_cached(
                "UPDATE workers SET last_seen_ms = MAX(last_seen_ms, ?2), step_rate = COALESCE(?3, step_rate) WHERE key = ?1",
            )?;
            for (key, seen, rate) in &soft.workers {
                worker.execute(params![key, *seen as i64, rate])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// What the core is rebuilt from: workers (with flags), every block's version, wire
    /// and last progress, the leases and decisions of current versions and of the
    /// `max_staleness` versions before them (with those versions' wires), the pending
    /// updates of current rounds (stale ones included), invites, and the last lease id.
    pub fn rebuild(&self, max_staleness: u64) -> Result<crate::core::Rebuild> {
        use crate::core::WorkerState;
        let mut r = crate::core::Rebuild::default();
        let mut st = self.conn.prepare(
            "SELECT w.key, w.step_rate, w.last_block, w.data_hash IS NOT NULL, w.last_seen_ms,
                    EXISTS(SELECT 1 FROM flags f WHERE f.worker = w.key)
             FROM workers w",
        )?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                WorkerState {
                    step_rate: r.get(1)?,
                    last_block: r.get::<_, Option<i64>>(2)?.map(|b| b as usize),
                    own_data: r.get(3)?,
                    last_seen_ms: r.get::<_, i64>(4)? as u64,
                    flagged: r.get(5)?,
                },
            ))
        })? {
            let (key, w) = row?;
            r.workers.insert(key, w);
        }
        for head in self.heads()? {
            let progress = self.last_progress_ms(head.block)?;
            r.blocks.push((head.version, head.wire, progress));
        }
        // Versions within the window: b.version - K <= version <= b.version; of older
        // versions only the active leases, as a commit keeps them (a lapsed one's slot
        // may have been leased again).
        let k = max_staleness as i64;
        let mut st = self.conn.prepare(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases l JOIN blocks b ON b.block = l.block
             AND l.version <= b.version AND l.version + ?1 >= b.version
             WHERE l.version = b.version OR l.state = 'active' ORDER BY l.id"
        ))?;
        r.leases = st
            .query_map([k], lease_row)?
            .collect::<rusqlite::Result<_>>()?;
        let mut st = self.conn.prepare(
            "SELECT DISTINCT u.lease FROM updates u JOIN leases l ON l.id = u.lease
             JOIN blocks b ON b.block = l.block AND l.version <= b.version
             AND l.version + ?1 >= b.version",
        )?;
        r.decided = st
            .query_map([k], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut st = self.conn.prepare(
            "SELECT v.block, v.version, v.wire FROM versions v JOIN blocks b ON b.block = v.block
             AND v.version < b.version AND v.version + ?1 >= b.version WHERE v.pruned = 0
             ORDER BY v.block, v.version",
        )?;
        r.old_wires = st
            .query_map([k], |r| {
                Ok((
                    r.get::<_, i64>(0)? as usize,
                    r.get::<_, i64>(1)? as u64,
                    r.get(2)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for b in 0..r.blocks.len() {
            let version = r.blocks[b].0;
            for p in self.pending(b, version)? {
                r.pending.push((b, p));
            }
        }
        let mut st = self.conn.prepare("SELECT token, worker FROM invites")?;
        for row in st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
            let (token, worker): (String, String) = row?;
            r.invites.insert(token, worker);
        }
        r.last_lease = self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM leases", [], |r| r.get(0))?;
        Ok(r)
    }

    /// Binds invite `token` (its hash) to `worker` if it is free; returns the other
    /// owner when it is taken.
    pub fn claim_invite(&self, token: &str, worker: &str) -> Result<Option<String>> {
        self.conn.execute(
            "INSERT OR IGNORE INTO invites (token, worker) VALUES (?1, ?2)",
            params![token, worker],
        )?;
        let owner: String = self.conn.query_row(
            "SELECT worker FROM invites WHERE token = ?1",
            [token],
            |r| r.get(0),
        )?;
        Ok((owner != worker).then_some(owner))
    }

    /// When `block` last moved: its head's commit or its latest accepted update.
    pub fn last_progress_ms(&self, block: usize) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT MAX(COALESCE((SELECT MAX(committed_ms) FROM versions WHERE block = ?1), 0),
                        COALESCE((SELECT MAX(received_ms) FROM updates WHERE block = ?1
                                  AND state != 'rejected'), 0))",
            [block as i64],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Whether any upload on `lease` was decided (accepted or refused): a lease gets one.
    pub fn lease_decided(&self, lease: i64) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM updates WHERE lease = ?1)",
            [lease],
            |r| r.get(0),
        )?)
    }

    /// One lease, of any round.
    pub fn lease(&self, id: i64) -> Result<Option<LeaseRow>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases l WHERE l.id = ?1"
            ))?
            .query_row([id], lease_row)
            .optional()?)
    }

    /// Sets a lease's state.
    pub fn set_lease_state(&self, id: i64, state: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE leases SET state = ?2 WHERE id = ?1",
            params![id, state],
        )?;
        Ok(())
    }

    /// Gives every active lease until at least `until` (after a coordinator restart, so
    /// its downtime is not charged to the workers).
    pub fn extend_active_leases(&self, until: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE leases SET expires_ms = MAX(expires_ms, ?1) WHERE state = 'active'",
            [until as i64],
        )?;
        Ok(())
    }
}

const LEASE_COLUMNS: &str =
    "l.id, l.worker, l.block, l.version, l.slot, l.steps, l.seed, l.issued_ms, l.expires_ms, l.state, l.public";

fn lease_row(r: &rusqlite::Row) -> rusqlite::Result<LeaseRow> {
    Ok(LeaseRow {
        id: r.get(0)?,
        worker: r.get(1)?,
        block: r.get::<_, i64>(2)? as usize,
        version: r.get::<_, i64>(3)? as u64,
        slot: r.get(4)?,
        steps: r.get(5)?,
        seed: r.get::<_, i64>(6)? as u64,
        issued_ms: r.get::<_, i64>(7)? as u64,
        expires_ms: r.get::<_, i64>(8)? as u64,
        state: r.get(9)?,
        public: r.get(10)?,
    })
}
