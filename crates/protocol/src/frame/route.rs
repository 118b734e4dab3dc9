//! Routes: the stages a request crosses, each a block range and its replicas.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ProtocolError, Result};

/// Most stages a route may have.
pub const MAX_STAGES: usize = 64;
/// Most replicas a route may list per stage.
pub const MAX_REPLICAS: usize = 16;
/// Highest block (or layer) number a range may name.
pub const MAX_BLOCK: u32 = 1 << 20;

/// A contiguous range of 1-based blocks (or layers), inclusive: `3..4` is blocks 3 and 4.
/// Deserialising goes through [`BlockRange::new`], so a peer cannot send an empty,
/// inverted or out-of-range one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRange")]
pub struct BlockRange {
    /// First block, 1-based.
    pub first: u32,
    /// Last block, inclusive.
    pub last: u32,
}

#[derive(Deserialize)]
struct RawRange {
    first: u32,
    last: u32,
}

impl TryFrom<RawRange> for BlockRange {
    type Error = ProtocolError;

    fn try_from(r: RawRange) -> Result<Self> {
        BlockRange::new(r.first, r.last)
    }
}

impl BlockRange {
    /// `first..=last`, checked: 1 <= first <= last <= [`MAX_BLOCK`].
    pub fn new(first: u32, last: u32) -> Result<Self> {
        if first == 0 || first > last || last > MAX_BLOCK {
            return Err(ProtocolError::Rejected(format!(
                "block range {first}..{last}: blocks are numbered from 1 to {MAX_BLOCK} and the range must not be empty"
            )));
        }
        Ok(BlockRange { first, last })
    }

    /// Blocks in the range.
    pub fn len(&self) -> u32 {
        self.last - self.first + 1
    }

    /// Never true for a checked range; here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// Whether `block` (1-based) is in the range.
    pub fn contains(&self, block: u32) -> bool {
        (self.first..=self.last).contains(&block)
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.first, self.last)
    }
}

impl FromStr for BlockRange {
    type Err = ProtocolError;

    /// `3..4` (inclusive) or a single `3`.
    fn from_str(s: &str) -> Result<Self> {
        let num = |p: &str| {
            p.trim().parse::<u32>().map_err(|_| {
                ProtocolError::Malformed(format!(
                    "block range '{s}': expected FIRST..LAST (1-based, inclusive) or one block number"
                ))
            })
        };
        match s.split_once("..") {
            Some((a, b)) => BlockRange::new(num(a)?, num(b.trim_start_matches('='))?),
            None => {
                let b = num(s)?;
                BlockRange::new(b, b)
            }
        }
    }
}

/// One stage of a route: a block range and the servers that host it (tried in order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Blocks this stage runs.
    pub blocks: BlockRange,
    /// `host:port` of each replica.
    pub replicas: Vec<String>,
}

/// A route must name its receiver, give every stage one to [`MAX_REPLICAS`] servers,
/// and have at most [`MAX_STAGES`] stages (a server dials what a route names).
pub(super) fn check_route(route: &[Stage], hop: u32) -> Result<()> {
    if route.len() > MAX_STAGES || route.iter().any(|s| s.replicas.len() > MAX_REPLICAS) {
        return Err(ProtocolError::Rejected(format!(
            "a route may have {MAX_STAGES} stages of {MAX_REPLICAS} replicas at most"
        )));
    }
    if hop as usize >= route.len() {
        return Err(ProtocolError::Malformed(format!(
            "hop {hop} of a {}-stage route",
            route.len()
        )));
    }
    if let Some(s) = route.iter().find(|s| s.replicas.is_empty()) {
        return Err(ProtocolError::Malformed(format!(
            "stage {} has no server",
            s.blocks
        )));
    }
    Ok(())
}
