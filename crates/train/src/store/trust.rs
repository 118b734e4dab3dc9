//! Trust rows: claims, screening results, held-out history, flags, invites.
use super::*;

/// A claim row (an update's, from the worker or the coordinator's own account).
pub(super) const CLAIM_ROW: &str =
    "INSERT OR REPLACE INTO claims (update_id, claim, sig) VALUES (?1, ?2, ?3)";
/// A screening row: the held-out loss before and after the update alone.
pub(super) const SCREENING_ROW: &str =
    "INSERT OR REPLACE INTO screening (update_id, before, after) VALUES (?1, ?2, ?3)";

impl Store {
    /// Stores the worker's claim (JSON) and its signature for an update.
    pub fn put_claim(&self, update: i64, claim: &str, sig: Option<&str>) -> Result<()> {
        self.conn.execute(CLAIM_ROW, params![update, claim, sig])?;
        Ok(())
    }

    /// The claim stored for an update.
    pub fn claim(&self, update: i64) -> Result<Option<(String, Option<String>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT claim, sig FROM claims WHERE update_id = ?1",
                [update],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// An update's held-out loss before and after.
    pub fn screening(&self, update: i64) -> Result<Option<(f64, f64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT before, after FROM screening WHERE update_id = ?1",
                [update],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Records a version's held-out loss.
    pub fn put_version_loss(&self, block: usize, version: u64, loss: f64, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO version_loss (block, version, heldout, time_ms) VALUES (?1, ?2, ?3, ?4)",
            params![block as i64, version as i64, loss, now as i64],
        )?;
        Ok(())
    }

    /// The held-out change (after - before) of the last `limit` accepted updates of
    /// `block`, oldest first.
    pub fn recent_screen_changes(&self, block: usize, limit: usize) -> Result<Vec<f64>> {
        let mut st = self.conn.prepare(
            "SELECT s.after - s.before FROM screening s JOIN updates u ON u.id = s.update_id
             WHERE u.block = ?1 AND u.state != 'rejected' ORDER BY u.id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![block as i64, limit as i64], |r| r.get(0))?;
        let mut v: Vec<f64> = rows.collect::<rusqlite::Result<_>>()?;
        v.reverse();
        Ok(v)
    }

    /// Held-out loss of every evaluated version of a block: (version, time_ms, loss).
    pub fn version_losses(&self, block: usize) -> Result<Vec<(u64, u64, f64)>> {
        version_losses(&self.conn, block)
    }

    /// Notes that an update's decision is in the ledger as receipt `index`.
    pub fn mark_receipted(&self, update: i64, index: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO receipted (update_id, receipt) VALUES (?1, ?2)",
            params![update, index as i64],
        )?;
        Ok(())
    }

    /// Decided updates (applied, or refused after authentication: their claim is on
    /// record) with no receipt yet: (id, the version of the round it joined (its base
    /// version plus its staleness), state, reason). A crash between a decision and its
    /// receipt leaves these; the coordinator issues them at start-up.
    #[allow(clippy::type_complexity)]
    pub fn unreceipted(&self) -> Result<Vec<(i64, Option<i64>, String, Option<String>)>> {
        let mut st = self.conn.prepare(
            "SELECT u.id, u.version + u.staleness, u.state, u.reason
             FROM updates u LEFT JOIN receipted r ON r.update_id = u.id
             WHERE r.update_id IS NULL AND u.state != 'pending'
               AND (u.state = 'applied' OR u.id IN (SELECT update_id FROM claims))
             ORDER BY u.id",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// An update's worker, lease and body hash.
    #[allow(clippy::type_complexity)]
    pub fn update_origin(&self, id: i64) -> Result<Option<(String, Option<i64>, Option<String>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT worker, lease, hash FROM updates WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
    }

    /// Counts a failed check against a worker.
    pub fn flag_worker(&self, worker: &str, reason: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO flags (worker, failed_checks, last_reason) VALUES (?1, 1, ?2)
             ON CONFLICT(worker) DO UPDATE SET failed_checks = failed_checks + 1, last_reason = excluded.last_reason",
            params![worker, reason],
        )?;
        Ok(())
    }

    /// Workers with failed checks: (key, count, last reason).
    pub fn flagged(&self) -> Result<Vec<(String, i64, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT worker, failed_checks, last_reason FROM flags ORDER BY worker")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// An accepted (pending or applied) update with this body hash, if any: its id and worker.
    pub fn accepted_with_hash(&self, hash: &str) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, worker FROM updates WHERE hash = ?1 AND state != 'rejected' LIMIT 1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// A meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Sets a meta value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// Held-out loss of every evaluated version of a block, on any connection to the
/// database (the HTTP layer's reader uses its own).
pub fn version_losses(conn: &Connection, block: usize) -> Result<Vec<(u64, u64, f64)>> {
    let mut st = conn.prepare(
        "SELECT version, time_ms, heldout FROM version_loss WHERE block = ?1 ORDER BY version",
    )?;
    let rows = st.query_map([block as i64], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
            r.get(2)?,
        ))
    })?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}
