//! The server registry's bodies: a block server announces what it hosts to a
//! coordinator (`POST /v1/servers/announce`, signed like every worker request), and
//! clients read the live servers back (`GET /v1/servers`) to build a route.
//!
//! An announcement is a claim, not a fact: clients still ask each server what it hosts
//! over the wire before routing through it, and block servers forward only to servers
//! that answered for the same model. So a false announcement costs a client one `Info`
//! round trip, never a request sent to the wrong place.
use serde::{Deserialize, Serialize};

use crate::frame::BlockRange;

/// Longest model id accepted (the ids servers report are 16 to 40 characters).
pub const MAX_MODEL_ID: usize = 128;
/// Longest `host:port` accepted.
pub const MAX_ADDR: usize = 255;
/// Longest family name accepted (`block`, `edm`, `ar`).
pub const MAX_FAMILY: usize = 16;
/// Blocks (or AR layers) in a model, at most.
pub const MAX_TOTAL: u32 = 4096;
/// Shortest and longest life of an announcement, seconds: a server renews well within it.
pub const TTL_SECS: (u32, u32) = (5, 600);

/// `POST /v1/servers/announce` body: what a block server hosts and how busy it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The model id the server reports in its `ServerInfo`.
    pub model_id: String,
    /// `block`, `edm` or `ar`.
    pub family: String,
    /// Blocks (or AR layers) it hosts.
    pub blocks: BlockRange,
    /// Blocks (or layers) in the whole model.
    pub total: u32,
    /// Where clients reach it: `host:port`.
    pub addr: String,
    /// Passes computed since it started (its `ServerInfo::served`).
    pub served: u64,
    /// Passes per second over the last announcement interval: its measured throughput
    /// under the load it had.
    pub passes_per_s: f64,
    /// Mean compute time of one pass over that interval, ms (None before its first pass).
    pub pass_ms: Option<f64>,
    /// Seconds this announcement stays live unless renewed.
    pub ttl_secs: u32,
    /// The run's join proof for this key (runs with a join secret, for a key that has
    /// not registered as a worker).
    #[serde(default)]
    pub join_proof: Option<String>,
}

impl Announcement {
    /// Checks every field's bounds and shape; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if self.model_id.is_empty() || self.model_id.len() > MAX_MODEL_ID {
            return Err(format!("model_id must be 1..={MAX_MODEL_ID} bytes"));
        }
        if !printable(&self.model_id) {
            return Err("model_id must be printable ASCII without spaces".into());
        }
        if !matches!(self.family.as_str(), "block" | "edm" | "ar") {
            return Err(format!(
                "family must be block, edm or ar, got {:?}",
                truncated(&self.family, MAX_FAMILY)
            ));
        }
        if self.total == 0 || self.total > MAX_TOTAL {
            return Err(format!("total must be 1..={MAX_TOTAL}, got {}", self.total));
        }
        if self.blocks.last > self.total {
            return Err(format!(
                "blocks {} exceed the model's {} blocks",
                self.blocks, self.total
            ));
        }
        check_addr(&self.addr)?;
        if !(self.passes_per_s.is_finite() && self.passes_per_s >= 0.0) {
            return Err("passes_per_s must be a finite number >= 0".into());
        }
        if self.pass_ms.is_some_and(|m| !(m.is_finite() && m >= 0.0)) {
            return Err("pass_ms must be a finite number >= 0".into());
        }
        let (lo, hi) = TTL_SECS;
        if !(lo..=hi).contains(&self.ttl_secs) {
            return Err(format!(
                "ttl_secs must be {lo}..={hi}, got {}",
                self.ttl_secs
            ));
        }
        Ok(())
    }
}

/// A `host:port` a client could dial: bounded, printable, a non-zero port, and a host
/// that is an IP address or a DNS name. The registry never dials it; clients do, and
/// then only to ask what it hosts.
pub fn check_addr(addr: &str) -> Result<(), String> {
    if addr.is_empty() || addr.len() > MAX_ADDR {
        return Err(format!("addr must be 1..={MAX_ADDR} bytes"));
    }
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return match sa.port() {
            0 => Err("addr has port 0".into()),
            _ if sa.ip().is_unspecified() => Err(format!(
                "addr {addr} is unspecified (0.0.0.0 or ::): announce the address clients dial (serve --public-addr)"
            )),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("addr {:?} is not host:port", truncated(addr, 64)));
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !(port_ok && host_ok) {
        return Err(format!(
            "addr {:?} is not host:port (an IP address or a DNS name, and a port 1..=65535)",
            truncated(addr, 64)
        ));
    }
    Ok(())
}

/// At most `n` characters of `s`, for quoting peer input in an error.
fn truncated(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One live server, as the registry lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// The announcing key (hex).
    pub key: String,
    /// What it announced last (the join proof removed).
    pub announcement: Announcement,
    /// Milliseconds since that announcement.
    pub age_ms: u64,
    /// Milliseconds until it expires unless renewed.
    pub expires_in_ms: u64,
}

/// Which servers cover one block of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockCoverage {
    /// The block (or AR layer), 1-based.
    pub block: u32,
    /// Live servers hosting it.
    pub servers: u32,
}

/// One model's live servers and how well they cover its blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCoverage {
    /// The model id.
    pub model_id: String,
    /// Its family.
    pub family: String,
    /// Blocks in the model.
    pub total: u32,
    /// Per block, how many servers host it.
    pub blocks: Vec<BlockCoverage>,
    /// Ranges of blocks no live server hosts (empty: a full route exists).
    pub gaps: Vec<BlockRange>,
}

/// `GET /v1/servers` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerList {
    /// Live servers, newest announcement first.
    pub servers: Vec<ServerEntry>,
    /// Per model, the coverage of its blocks.
    pub models: Vec<ModelCoverage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> Announcement {
        Announcement {
            model_id: "m-0123456789abcdef".into(),
            family: "block".into(),
            blocks: BlockRange { first: 1, last: 2 },
            total: 4,
            addr: "10.0.0.1:7100".into(),
            served: 0,
            passes_per_s: 0.0,
            pass_ms: None,
            ttl_secs: 30,
            join_proof: None,
        }
    }

    #[test]
    fn announcements_are_bounded_field_by_field() {
        ann().validate().unwrap();
        let bad = |f: fn(&mut Announcement), needle: &str| {
            let mut a = ann();
            f(&mut a);
            let e = a.validate().unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        bad(|a| a.model_id = "x".repeat(MAX_MODEL_ID + 1), "model_id");
        bad(|a| a.model_id = "two words".into(), "printable");
        bad(|a| a.family = "gpt".into(), "family");
        bad(|a| a.total = 0, "total");
        bad(|a| a.total = MAX_TOTAL + 1, "total");
        bad(|a| a.blocks = BlockRange { first: 3, last: 5 }, "exceed");
        bad(|a| a.addr = "0.0.0.0:7100".into(), "unspecified");
        bad(|a| a.addr = "10.0.0.1:0".into(), "port 0");
        bad(|a| a.addr = "no-port".into(), "host:port");
        bad(|a| a.addr = "a/b:80".into(), "host:port");
        bad(|a| a.addr = "h:99999".into(), "host:port");
        bad(
            |a| a.addr = format!("{}:80", "h".repeat(300)),
            "addr must be",
        );
        bad(|a| a.passes_per_s = f64::NAN, "passes_per_s");
        bad(|a| a.pass_ms = Some(-1.0), "pass_ms");
        bad(|a| a.ttl_secs = 1, "ttl_secs");
        bad(|a| a.ttl_secs = 100_000, "ttl_secs");
        let mut named = ann();
        named.addr = "server-3.example.org:7100".into();
        named.validate().unwrap();
        named.addr = "[::1]:7100".into();
        named.validate().unwrap();
    }
}
