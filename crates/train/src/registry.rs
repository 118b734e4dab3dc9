//! The registry of block servers: who announced what, until when. Pure memory with the
//! time passed in, like the [`crate::core`]; the HTTP routes authenticate and admit the
//! announcing key first.
//!
//! It is soft state and is not journaled: servers renew every few seconds, so a
//! restarted coordinator knows them all again within one renewal, and a crash never
//! leaves a dead server listed. Everything is bounded, since keys are free on an open
//! run and one announcer may hold many:
//! - one entry per key (a key's new announcement replaces its old one), [`MAX_SERVERS`]
//!   in all;
//! - one key per announced address: the first key to announce a `host:port` holds it for
//!   as long as it renews, and another key's announcement of it is refused (last writer
//!   wins would let anyone evict a listed server by announcing its address with a wrong
//!   model; what is left is that a key can hold an address before its server does, until
//!   it stops renewing);
//! - [`MAX_PER_SOURCE`] entries per source host of the announcing requests (an IPv4
//!   address or IPv6 /64; loopback is not counted: behind a local proxy every announcer
//!   looks like loopback, and the other bounds still hold);
//! - [`MAX_MODELS`] model slots, each held until the last announcement naming its model
//!   expires (so re-announcing under another model, or being removed, does not free it
//!   early: model ids, each a set of metric series, cannot be churned), and freed once no
//!   announcement of it is live.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use blocktrain_protocol::frame::BlockRange;
use blocktrain_protocol::registry::{
    Announcement, BlockCoverage, ModelCoverage, ServerEntry, ServerList,
};

/// Live servers remembered at once.
pub const MAX_SERVERS: usize = 1024;
/// Models with live servers at once (each is a set of metric series).
pub const MAX_MODELS: usize = 16;
/// Live entries whose announcing requests came from one host.
pub const MAX_PER_SOURCE: usize = 32;

#[derive(Clone, Debug)]
struct Entry {
    announcement: Announcement,
    at_ms: u64,
    expires_ms: u64,
    /// The announced address, one spelling per address ([`addr_key`]).
    addr: String,
    /// The host the announcement came from ([`blocktrain_protocol::host_of`]); None:
    /// loopback, not counted.
    source: Option<String>,
}

/// Why an announcement was refused.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// A field out of bounds (the message says which).
    Invalid(String),
    /// The registry is full (of servers or of models).
    Full(String),
    /// The address is held by another key.
    Taken(String),
    /// The announcing host holds its share of entries.
    Quota(String),
}

/// Live announcements by key, and the model slots they hold.
#[derive(Debug, Default)]
pub struct Registry {
    entries: HashMap<String, Entry>,
    /// Per model, until when its slot is held (the latest expiry announced for it).
    models: HashMap<String, u64>,
}

/// One spelling per address: an IP address in its canonical form (v4-mapped IPv6 is
/// IPv4), a host name in lower case.
fn addr_key(addr: &str) -> String {
    match addr.parse::<SocketAddr>() {
        Ok(sa) => SocketAddr::new(sa.ip().to_canonical(), sa.port()).to_string(),
        Err(_) => addr.to_ascii_lowercase(),
    }
}

impl Registry {
    /// Records `a` from `key`, sent from `source` (the announcing request's peer), at
    /// `now`, replacing the key's previous announcement; a refusal changes nothing.
    pub fn announce(
        &mut self,
        key: &str,
        mut a: Announcement,
        source: Option<IpAddr>,
        now: u64,
    ) -> Result<(), Refused> {
        a.validate().map_err(Refused::Invalid)?;
        a.join_proof = None; // a secret's proof is checked, never listed
        self.expire(now);
        let addr = addr_key(&a.addr);
        if let Some((k, e)) = self
            .entries
            .iter()
            .find(|(k, e)| k.as_str() != key && e.addr == addr)
        {
            return Err(Refused::Taken(format!(
                "{} is announced by another key ({}, for {} s more unless renewed): an address is held by the first key that announces it",
                a.addr,
                crate::short(k),
                e.expires_ms.saturating_sub(now).div_ceil(1000)
            )));
        }
        let source = source
            .filter(|ip| !ip.to_canonical().is_loopback())
            .map(blocktrain_protocol::host_of);
        if let Some(src) = &source {
            let n = self
                .entries
                .iter()
                .filter(|(k, e)| k.as_str() != key && e.source.as_ref() == Some(src))
                .count();
            if n >= MAX_PER_SOURCE {
                return Err(Refused::Quota(format!(
                    "{n} live announcements came from {src} already; this coordinator takes at most {MAX_PER_SOURCE} from one host"
                )));
            }
        }
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_SERVERS {
            return Err(Refused::Full(format!(
                "the registry holds {MAX_SERVERS} live servers; try again when one expires"
            )));
        }
        if !self.models.contains_key(&a.model_id) && self.models.len() >= MAX_MODELS {
            return Err(Refused::Full(format!(
                "the registry holds {MAX_MODELS} model slots already (each until the last announcement of its model expires); this coordinator lists at most that many"
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
        let held = self.models.entry(a.model_id.clone()).or_insert(expires_ms);
        *held = (*held).max(expires_ms);
        self.entries.insert(
            key.to_string(),
            Entry {
                announcement: a,
                at_ms: now,
                expires_ms,
                addr,
                source,
            },
        );
        Ok(())
    }

    /// Drops `key`'s announcement (a flagged key, or a server going away); its model's
    /// slot stays held until the announcement would have expired.
    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Forgets announcements, and model slots, that expired by `now`.
    pub fn expire(&mut self, now: u64) {
        self.entries.retain(|_, e| e.expires_ms > now);
        self.models.retain(|_, until| *until > now);
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

    /// Announces `a` from `key` at an address of the key's own, from loopback (not
    /// counted per source).
    fn put(r: &mut Registry, key: &str, mut a: Announcement, now: u64) -> Result<(), Refused> {
        a.addr = format!("{key}.example:7100");
        r.announce(key, a, None, now)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn coverage_counts_replicas_and_names_gaps() {
        let mut r = Registry::default();
        put(&mut r, "k1", ann("m", 1, 1, 30), 0).unwrap();
        put(&mut r, "k2", ann("m", 1, 1, 30), 0).unwrap();
        put(&mut r, "k3", ann("m", 4, 4, 30), 0).unwrap();
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
        put(&mut r, "k4", ann("m", 2, 3, 30), 0).unwrap();
        assert!(r.list(None, 1000).models[0].gaps.is_empty());
        // A trailing gap is reported too.
        let mut t = Registry::default();
        put(&mut t, "k", ann("m", 1, 2, 30), 0).unwrap();
        assert_eq!(
            t.list(None, 0).models[0].gaps,
            vec![BlockRange { first: 3, last: 4 }]
        );
    }

    #[test]
    fn announcements_expire_and_renewals_replace() {
        let mut r = Registry::default();
        put(&mut r, "k1", ann("m", 1, 2, 10), 0).unwrap();
        assert_eq!(r.list(None, 9_999).servers.len(), 1);
        assert_eq!(r.list(None, 10_000).servers.len(), 0, "expired at its ttl");
        put(&mut r, "k1", ann("m", 1, 2, 10), 5_000).unwrap();
        put(&mut r, "k1", ann("m", 3, 4, 10), 8_000).unwrap();
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
            put(&mut r, &format!("k{i}"), ann("m", 1, 1, 30), 0).unwrap();
        }
        let full = put(&mut r, "new", ann("m", 1, 1, 30), 0).unwrap_err();
        assert!(matches!(full, Refused::Full(_)));
        // A known key still renews when full; an expired registry has room again.
        put(&mut r, "k0", ann("m", 1, 1, 30), 1).unwrap();
        put(&mut r, "new", ann("m", 1, 1, 30), 40_000).unwrap();

        let mut models = Registry::default();
        for i in 0..MAX_MODELS {
            put(
                &mut models,
                &format!("k{i}"),
                ann(&format!("m{i}"), 1, 1, 30),
                0,
            )
            .unwrap();
        }
        assert!(matches!(
            put(&mut models, "x", ann("another", 1, 1, 30), 0),
            Err(Refused::Full(_))
        ));
        // A key moving to another model leaves its old model's slot held until its
        // announcement would have expired: model ids cannot be churned.
        let e = put(&mut models, "k0", ann("moved", 1, 1, 30), 0).unwrap_err();
        assert!(
            matches!(e, Refused::Full(ref m) if m.contains("model slots")),
            "{e:?}"
        );
        assert_eq!(models.list(None, 0).servers.len(), MAX_MODELS, "intact");

        let mut shapes = Registry::default();
        put(&mut shapes, "a", ann("m", 1, 1, 30), 0).unwrap();
        let mut other = ann("m", 1, 1, 30);
        other.total = 8;
        assert!(matches!(
            put(&mut shapes, "b", other, 0),
            Err(Refused::Invalid(_))
        ));
        let mut bad = ann("m", 1, 1, 30);
        bad.addr = "0.0.0.0:1".into();
        assert!(matches!(
            shapes.announce("c", bad, None, 0),
            Err(Refused::Invalid(_))
        ));
    }

    #[test]
    fn model_slots_are_freed_by_expiry_only() {
        let mut r = Registry::default();
        for i in 0..MAX_MODELS {
            put(&mut r, &format!("k{i}"), ann(&format!("m{i}"), 1, 1, 30), 0).unwrap();
        }
        // k0 cannot move to a new model while the table is full, and removing it leaves
        // m0 with no server but its slot held until k0's announcement would expire (30 s).
        assert!(put(&mut r, "k0", ann("new", 1, 1, 30), 10_000).is_err());
        r.remove("k0");
        assert!(put(&mut r, "x", ann("new", 1, 1, 30), 10_000).is_err());
        for i in 1..MAX_MODELS {
            put(
                &mut r,
                &format!("k{i}"),
                ann(&format!("m{i}"), 1, 1, 30),
                20_000,
            )
            .unwrap();
        }
        assert!(put(&mut r, "x", ann("new", 1, 1, 30), 29_999).is_err());
        // At 30 s m0's slot is free: a model with no live server gives it up.
        put(&mut r, "x", ann("new", 1, 1, 30), 30_000).unwrap();
        assert!(!r.models.contains_key("m0"));
        assert_eq!(r.models.len(), MAX_MODELS);
        assert_eq!(r.list(None, 30_000).models.len(), MAX_MODELS);
    }

    #[test]
    fn an_address_is_held_by_the_first_key_until_it_expires() {
        let mut r = Registry::default();
        let at = |addr: &str| Announcement {
            addr: addr.into(),
            ..ann("m", 1, 1, 30)
        };
        r.announce("a", at("10.0.0.1:7100"), None, 0).unwrap();
        // Another key, the same address (however it is spelled): refused, nothing changed.
        for spelling in ["10.0.0.1:7100", "[::ffff:10.0.0.1]:7100"] {
            let e = r.announce("b", at(spelling), None, 1_000).unwrap_err();
            assert!(
                matches!(e, Refused::Taken(ref m) if m.contains("another key")),
                "{e:?}"
            );
        }
        r.announce("c", at("Host.Example:7100"), None, 0).unwrap();
        assert!(matches!(
            r.announce("d", at("host.example:7100"), None, 0),
            Err(Refused::Taken(_))
        ));
        let list = r.list(None, 1_000);
        assert_eq!(list.servers.len(), 2);
        assert!(list.servers.iter().any(|e| e.key == "a"));
        // The holder renews and moves freely; once it lapses, the address is free.
        r.announce("a", at("10.0.0.1:7100"), None, 10_000).unwrap();
        r.announce("a", at("10.0.0.2:7100"), None, 11_000).unwrap();
        r.announce("b", at("10.0.0.1:7100"), None, 11_000).unwrap();
        assert!(r.announce("a", at("10.0.0.1:7100"), None, 12_000).is_err());
        r.announce("a", at("10.0.0.3:7100"), None, 50_000).unwrap();
        r.announce("e", at("10.0.0.1:7100"), None, 50_000).unwrap();
    }

    #[test]
    fn one_source_host_holds_at_most_its_quota() {
        let mut r = Registry::default();
        let from = |i: usize| Announcement {
            addr: format!("10.1.0.{i}:7100"),
            ..ann("m", 1, 1, 30)
        };
        for i in 0..MAX_PER_SOURCE {
            r.announce(&format!("k{i}"), from(i), ip("203.0.113.7"), 0)
                .unwrap();
        }
        let e = r
            .announce("extra", from(200), ip("203.0.113.7"), 0)
            .unwrap_err();
        assert!(
            matches!(e, Refused::Quota(ref m) if m.contains("203.0.113.7")),
            "{e:?}"
        );
        assert_eq!(r.list(None, 0).servers.len(), MAX_PER_SOURCE, "intact");
        // Its own keys still renew; another host, and loopback, are not counted.
        r.announce("k0", from(0), ip("203.0.113.7"), 1).unwrap();
        r.announce("extra", from(200), ip("203.0.113.8"), 0)
            .unwrap();
        r.announce("local", from(201), ip("127.0.0.1"), 0).unwrap();
        // An IPv6 host is its /64, and a v4-mapped address its IPv4 one.
        assert!(matches!(
            r.announce("v4m", from(202), ip("::ffff:203.0.113.7"), 0),
            Err(Refused::Quota(_))
        ));
        for i in 0..MAX_PER_SOURCE {
            let src = format!("2001:db8:1:2::{:x}", i + 1);
            r.announce(&format!("v6-{i}"), from(100 + i), ip(&src), 0)
                .unwrap();
        }
        assert!(matches!(
            r.announce("v6-x", from(250), ip("2001:db8:1:2:ffff::1"), 0),
            Err(Refused::Quota(_))
        ));
        r.announce("v6-y", from(251), ip("2001:db8:1:3::1"), 0)
            .unwrap();
        // Expired entries give the quota back.
        r.announce("extra2", from(252), ip("203.0.113.7"), 30_000)
            .unwrap();
    }

    #[test]
    fn a_model_filter_lists_only_that_model() {
        let mut r = Registry::default();
        put(&mut r, "a", ann("m1", 1, 4, 30), 0).unwrap();
        put(&mut r, "b", ann("m2", 1, 4, 30), 0).unwrap();
        let list = r.list(Some("m2"), 0);
        assert_eq!(list.servers.len(), 1);
        assert_eq!(list.models.len(), 1);
        assert_eq!(list.models[0].model_id, "m2");
    }
}
