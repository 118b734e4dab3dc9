//! A block server's byte budget: the frames all its connections hold at once, from a
//! frame's header (its declared size, before the payload is allocated) until what it
//! carried is done with. Requests from upstream take from it as they are read, and so
//! do the answers read from the next stage ([`crate::hop::HopLimits::budget`]), held
//! until they are relayed upstream.
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Frames up to this size are not counted against the budget: all `max_connections` of
/// them are at most 64 MiB at the default 1024, and the small frames most requests are
/// (an `Info`, an AR step, a short prompt) stay admitted while large ones have taken it.
pub const UNCOUNTED_FRAME: usize = 64 * 1024;

/// Bytes that frames may hold at once, shared by every connection of a server (and
/// its calls downstream). Clones share the budget.
#[derive(Clone)]
pub struct ByteBudget {
    limit: usize,
    /// Bytes, one permit each.
    free: Arc<Semaphore>,
}

impl std::fmt::Debug for ByteBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ByteBudget({} of {} free)", self.available(), self.limit)
    }
}

/// Bytes taken from a [`ByteBudget`] for one frame; dropping it gives them back.
#[derive(Debug)]
pub struct Held {
    _bytes: OwnedSemaphorePermit,
}

impl ByteBudget {
    /// A budget of `limit` bytes (`serve --max-buffered-mb`).
    pub fn new(limit: usize) -> ByteBudget {
        ByteBudget {
            limit,
            free: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Bytes not held now.
    pub fn available(&self) -> usize {
        self.free.available_permits()
    }

    /// Takes `len` bytes for a frame about to be read (none for a frame of at most
    /// [`UNCOUNTED_FRAME`]), or says why not, naming the flag.
    ///
    /// Refused at once rather than waited for: a connection waiting for bytes other
    /// connections hold would itself be held (with its place among the connections) by
    /// whoever holds them, and a refused caller can try another replica now, as for
    /// `--max-inflight`.
    pub fn reserve(&self, len: usize) -> Result<Option<Held>, String> {
        if len <= UNCOUNTED_FRAME {
            return Ok(None);
        }
        let limit = self.limit;
        let refuse = |what: String| {
            format!(
                "frame buffer limit: {what} (--max-buffered-mb {})",
                limit >> 20
            )
        };
        if len > limit {
            return Err(refuse(format!(
                "a frame of {len} bytes exceeds the {limit} bytes all connections may hold"
            )));
        }
        let n = u32::try_from(len).map_err(|_| refuse(format!("a frame of {len} bytes")))?;
        self.free
            .clone()
            .try_acquire_many_owned(n)
            .map(|p| Some(Held { _bytes: p }))
            .map_err(|_| {
                refuse(format!(
                    "{} of {limit} bytes are held by frames being read or served; a frame of {len} bytes does not fit",
                    limit - self.available()
                ))
            })
    }
}
