//! Leases: issue, renewal, lapse, slots and their seeds' history.
use super::*;

impl Store {
    /// Inserts a lease and remembers the worker's block; returns its id.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_lease(
        &self,
        worker: &str,
        block: usize,
        version: u64,
        slot: u32,
        steps: i64,
        seed: u64,
        now: u64,
        expires: u64,
        public: bool,
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO leases (worker, block, version, slot, steps, seed, issued_ms, expires_ms, state, public)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'active', ?9)",
            params![worker, block as i64, version as i64, slot, steps, seed as i64, now as i64, expires as i64, public],
        )?;
        let id = self.conn.last_insert_rowid();
        self.conn.execute(
            "UPDATE workers SET last_block = ?2 WHERE key = ?1",
            params![worker, block as i64],
        )?;
        Ok(id)
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

    /// Leases of a round's slot closed by a refusal or a failed spot check.
    pub fn refusals_in_slot(&self, block: usize, version: u64, slot: u32) -> Result<u32> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM leases WHERE block = ?1 AND version = ?2 AND slot = ?3
             AND state IN ('refused', 'void')",
            params![block as i64, version as i64, slot],
            |r| r.get(0),
        )?)
    }

    /// When a lease was issued.
    pub fn lease_issued_ms(&self, lease: i64) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT issued_ms FROM leases WHERE id = ?1", [lease], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// One lease.
    pub fn lease(&self, id: i64) -> Result<Option<LeaseRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, worker, block, version, slot, steps, seed, expires_ms, state, public FROM leases WHERE id = ?1",
                [id],
                |r| {
                    Ok(LeaseRow {
                        id: r.get(0)?,
                        worker: r.get(1)?,
                        block: r.get::<_, i64>(2)? as usize,
                        version: r.get::<_, i64>(3)? as u64,
                        slot: r.get(4)?,
                        steps: r.get(5)?,
                        seed: r.get::<_, i64>(6)? as u64,
                        expires_ms: r.get::<_, i64>(7)? as u64,
                        state: r.get(8)?,
                        public: r.get(9)?,
                    })
                },
            )
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

    /// Extends an active lease.
    pub fn renew_lease(&self, id: i64, expires: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE leases SET expires_ms = ?2 WHERE id = ?1 AND state = 'active'",
            params![id, expires as i64],
        )?;
        Ok(())
    }

    /// Marks active leases past their deadline, or held longer than `max_ms` in all,
    /// expired; returns how many.
    pub fn expire_leases(&self, now: u64, max_ms: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE leases SET state = 'expired'
             WHERE state = 'active' AND (expires_ms <= ?1 OR issued_ms + ?2 <= ?1)",
            params![now as i64, max_ms as i64],
        )?)
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

    /// Shard slots held in a round by active leases or delivered updates.
    pub fn used_slots(&self, block: usize, version: u64) -> Result<Vec<u32>> {
        let mut st = self.conn.prepare(
            "SELECT slot FROM leases WHERE block = ?1 AND version = ?2 AND state IN ('active', 'delivered')",
        )?;
        let rows = st.query_map(params![block as i64, version as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Active leases and leases issued so far for a block's round.
    pub fn round_leases(&self, block: usize, version: u64) -> Result<(u32, u32)> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(state = 'active'), 0), COUNT(*) FROM leases WHERE block = ?1 AND version = ?2",
            params![block as i64, version as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// The active lease `worker` holds, if any.
    pub fn active_lease_of(&self, worker: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM leases WHERE worker = ?1 AND state = 'active' ORDER BY id DESC LIMIT 1",
                [worker],
                |r| r.get(0),
            )
            .optional()?)
    }
}
