//! The registry of block servers: who announced what, until when. Pure memory with the
//! time passed in, like the [`crate::core`]; the HTTP routes authenticate and admit the
//! announcing key first.
//!
//! It is soft state and is not journaled: servers renew every few seconds, so a
//! restarted coordinator knows them all again within one renewal, and a crash never
//! leaves a dead server listed. Everything is bounded: one entry per key (a key's new
//! announcement replaces its old one), [`MAX_SERVERS`] keys, [`MAX_MODELS`] models.
use std::collections::{BTreeMap, HashMap};

use blocktrain_protocol::frame::BlockRange;
use blocktrain_protocol::registry::{
    Announcement, BlockCoverage, ModelCoverage, ServerEntry, ServerList,
};

/// Live servers remembered at once.
pub const MAX_SERVERS: usize = 1024;
/// Models with live servers at once (each is a set of metric series).
pub const MAX_MODELS: usize = 16;

#[derive(Clone, Debug)]
struct Entry {
    announcement: Announcement,
    at_ms: u64,
    expires_ms: u64,
}

/// Why an announcement was refused.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// A field out of bounds (the message says which).
    Invalid(String),
    /// The registry is full (of servers or of models).
    Full(String),
}

/// Live announcements by key.
#[derive(Debug, Default)]
pub struct Registry {
    entries: HashMap<String, Entry>,
}

impl Registry {
    /// Records `a` from `key` at `now`, replacing the key's previous announcement.
    pub fn announce(&mut self, key: &str, mut a: Announcement, now: u64) -> Result<(), Refused> {
        a.validate().map_err(Refused::Invalid)?;
        a.join_proof = None; // a secret's proof is checked, never listed
        self.expire(now);
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_SERVERS {
            return Err(Refused::Full(format!(
                "the registry holds {MAX_SERVERS} live servers; try again when one expires"
            )));
        }
        let model_known = self
            .entries
            .iter()
            .any(|(k, e)| k != key && e.announcement.model_id == a.model_id);
        if !model_known && self.models_except(key) >= MAX_MODELS {
            return Err(Refused::Full(format!(
                "the registry lists {MAX_MODELS} models already; this coordinator lists at most that many"
            )));
        }
        // Servers of one model must agree on its shape, or routes built from them fail.
        if let Some(e) = self.entries.iter().find(|(k, e)| {
            k.as_str() != key
                && e.announcement.model_id == a.model_id
                && (e.announcement.family != a.family || e.announcement.total != a.total)
        }) {
            return Err(Refused::Invalid(format!(
                "model {} is announced as {} of {} blocks by other servers, this announcement says {} of {}",
                a.model_id, e.1.announcement.family, e.1.announcement.total, a.family, a.total
            )));
        }
        let expires_ms = now + u64::from(a.ttl_secs) * 1000;
        self.entries.insert(
            key.to_string(),
            Entry {
                announcement: a,
                at_ms: now,
                expires_ms,
            },
        );
        Ok(())
    }

    /// Drops `key`'s announcement (a flagged key, or a server going away).
    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Forgets announcements that expired by `now`.
    pub fn expire(&mut self, now: u64) {
        self.entries.retain(|_, e| e.expires_ms > now);
    }

    fn models_except(&self, key: &str) -> usize {
        let mut models: Vec<&str> = self
            .entries
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(_, e)| e.announcement.model_id.as_str())
            .collect();
        models.sort_unstable();
        models.dedup();
        models.len()
    }

    /// The live servers (of `model` only, when given), newest first, with each model's
    /// coverage of its blocks.
    pub fn list(&self, model: Option<&str>, now: u64) -> ServerList {
        let mut live: Vec<(&String, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires_ms > now)
            .filter(|(_, e)| model.is_none_or(|m| e.announcement.model_id == m))
            .collect();
        live.sort_by(|a, b| b.1.at_ms.cmp(&a.1.at_ms).then(a.0.cmp(b.0)));
        let mut by_model: BTreeMap<&str, Vec<&Announcement>> = BTreeMap::new();
        for (_, e) in &live {
            by_model
                .entry(e.announcement.model_id.as_str())
                .or_default()
                .push(&e.announcement);
        }
        let models = by_model
            .into_iter()
            .map(|(id, anns)| coverage(id, &anns))
            .collect();
        let servers = live
            .into_iter()
            .map(|(key, e)| ServerEntry {
                key: key.clone(),
                announcement: e.announcement.clone(),
                age_ms: now.saturating_sub(e.at_ms),
                expires_in_ms: e.expires_ms.saturating_sub(now),
            })
            .collect();
        ServerList { servers, models }
    }
}

/// Servers per block, and the ranges of blocks with none.
fn coverage(model_id: &str, anns: &[&Announcement]) -> ModelCoverage {
    let first = anns[0];
    let total = first.total;
    let mut count = vec![0u32; total as usize];
    for a in anns {
        for b in a.blocks.first..=a.blocks.last.min(total) {
            count[b as usize - 1] += 1;
        }
    }
    let mut gaps = Vec::new();
    let mut open: Option<u32> = None;
    for (i, &c) in count.iter().enumerate() {
        let block = i as u32 + 1;
        match (c, open) {
            (0, None) => open = Some(block),
            (0, Some(_)) => {}
            (_, Some(start)) => {
                gaps.push(BlockRange {
                    first: start,
                    last: block - 1,
                });
                open = None;
            }
            (_, None) => {}
        }
    }
    if let Some(start) = open {
        gaps.push(BlockRange {
            first: start,
            last: total,
        });
    }
    ModelCoverage {
        model_id: model_id.to_string(),
        family: first.family.clone(),
        total,
        blocks: count
            .iter()
            .enumerate()
            .map(|(i, &servers)| BlockCoverage {
                block: i as u32 + 1,
                servers,
            })
            .collect(),
        gaps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(model: &str, first: u32, last: u32, ttl: u32) -> Announcement {
        Announcement {
            model_id: model.into(),
            family: "block".into(),
            blocks: BlockRange { first, last },
            total: 4,
            addr: format!("10.0.0.{first}:7100"),
            served: 0,
            passes_per_s: 1.0,
            pass_ms: Some(5.0),
            ttl_secs: ttl,
            join_proof: Some("secret proof".into()),
        }
    }

    #[test]
    fn coverage_counts_replicas_and_names_gaps() {
        let mut r = Registry::default();
        r.announce("k1", ann("m", 1, 1, 30), 0).unwrap();
        r.announce("k2", ann("m", 1, 1, 30), 0).unwrap();
        r.announce("k3", ann("m", 4, 4, 30), 0).unwrap();
        let list = r.list(None, 1000);
        assert_eq!(list.servers.len(), 3);
        assert!(list
            .servers
            .iter()
            .all(|s| s.announcement.join_proof.is_none()));
        let m = &list.models[0];
        let counts: Vec<u32> = m.blocks.iter().map(|b| b.servers).collect();
        assert_eq!(counts, vec![2, 0, 0, 1]);
        assert_eq!(m.gaps, vec![BlockRange { first: 2, last: 3 }]);
        r.announce("k4", ann("m", 2, 3, 30), 0).unwrap();
        assert!(r.list(None, 1000).models[0].gaps.is_empty());
        // A trailing gap is reported too.
        let mut t = Registry::default();
        t.announce("k", ann("m", 1, 2, 30), 0).unwrap();
        assert_eq!(
            t.list(None, 0).models[0].gaps,
            vec![BlockRange { first: 3, last: 4 }]
        );
    }

    #[test]
    fn announcements_expire_and_renewals_replace() {
        let mut r = Registry::default();
        r.announce("k1", ann("m", 1, 2, 10), 0).unwrap();
        assert_eq!(r.list(None, 9_999).servers.len(), 1);
        assert_eq!(r.list(None, 10_000).servers.len(), 0, "expired at its ttl");
        r.announce("k1", ann("m", 1, 2, 10), 5_000).unwrap();
        r.announce("k1", ann("m", 3, 4, 10), 8_000).unwrap();
        let list = r.list(None, 14_000);
        assert_eq!(list.servers.len(), 1, "one entry per key");
        assert_eq!(list.servers[0].announcement.blocks.first, 3);
        assert_eq!(list.servers[0].age_ms, 6_000);
        assert_eq!(list.servers[0].expires_in_ms, 4_000);
        r.remove("k1");
        assert!(r.list(None, 14_000).servers.is_empty());
    }

    #[test]
    fn bounds_hold_and_disagreeing_shapes_are_refused() {
        let mut r = Registry::default();
        for i in 0..MAX_SERVERS {
            r.announce(&format!("k{i}"), ann("m", 1, 1, 30), 0).unwrap();
        }
        let full = r.announce("new", ann("m", 1, 1, 30), 0).unwrap_err();
        assert!(matches!(full, Refused::Full(_)));
        // A known key still renews when full; an expired registry has room again.
        r.announce("k0", ann("m", 1, 1, 30), 1).unwrap();
        r.announce("new", ann("m", 1, 1, 30), 40_000).unwrap();

        let mut models = Registry::default();
        for i in 0..MAX_MODELS {
            models
                .announce(&format!("k{i}"), ann(&format!("m{i}"), 1, 1, 30), 0)
                .unwrap();
        }
        assert!(matches!(
            models.announce("x", ann("another", 1, 1, 30), 0),
            Err(Refused::Full(_))
        ));
        // A key moving to another model does not count its own old one.
        models.announce("k0", ann("moved", 1, 1, 30), 0).unwrap();

        let mut shapes = Registry::default();
        shapes.announce("a", ann("m", 1, 1, 30), 0).unwrap();
        let mut other = ann("m", 1, 1, 30);
        other.total = 8;
        assert!(matches!(
            shapes.announce("b", other, 0),
            Err(Refused::Invalid(_))
        ));
        let mut bad = ann("m", 1, 1, 30);
        bad.addr = "0.0.0.0:1".into();
        assert!(matches!(
            shapes.announce("c", bad, 0),
            Err(Refused::Invalid(_))
        ));
    }

    #[test]
    fn a_model_filter_lists_only_that_model() {
        let mut r = Registry::default();
        r.announce("a", ann("m1", 1, 4, 30), 0).unwrap();
        r.announce("b", ann("m2", 1, 4, 30), 0).unwrap();
        let list = r.list(Some("m2"), 0);
        assert_eq!(list.servers.len(), 1);
        assert_eq!(list.models.len(), 1);
        assert_eq!(list.models[0].model_id, "m2");
    }
}
