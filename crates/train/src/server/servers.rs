//! The block-server registry's routes: `POST /v1/servers/announce` (signed) and
//! `GET /v1/servers` (public, rate-limited like every read). The registry itself is
//! [`crate::registry`]; this file authenticates, admits and bounds.
use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use axum::Json;
use blocktrain_protocol::registry::{Announcement, ServerList, MAX_MODEL_ID};

use super::auth::signed_json;
use super::{AppState, Reply};
use crate::coordinator::lock;
use crate::registry::Refused;
use crate::{now_ms, NodeError};

/// Per model, the blocks listed one by one in `/metrics` at most (a model with more
/// blocks shows its totals and gaps only, so the series stay bounded).
const METRIC_BLOCKS: u32 = 256;

fn registry(s: &AppState) -> std::sync::MutexGuard<'_, crate::registry::Registry> {
    s.registry.lock().unwrap_or_else(|p| p.into_inner())
}

/// `POST /v1/servers/announce`: the signature over the raw body is checked first, then
/// the key's admission ([`crate::core::Core::may_announce`]), then the body's bounds and
/// the registry's (an address per key, entries per announcing host, servers, models).
/// A refusal leaves the registry as it was; the server tries again at its next renewal.
pub(super) async fn announce(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let (key, a): (_, Announcement) = signed_json(&s.gate, &uri, &headers, &body, "announcement")?;
    lock(&s.core).may_announce(&key, a.join_proof.as_deref())?;
    let ttl_ms = u64::from(a.ttl_secs) * 1000;
    let mut reg = registry(&s);
    match reg.announce(&key, a, Some(peer.ip()), now_ms()) {
        Ok(()) => Ok(Json(
            serde_json::json!({ "ok": true, "expires_in_ms": ttl_ms }),
        )),
        // The caller's own bounds are a 4xx, whose message reaches the announcing server
        // (a 5xx is retried by clients and its message lost); a full registry is Busy.
        Err(Refused::Invalid(m) | Refused::Taken(m) | Refused::Quota(m)) => {
            Err(NodeError::Rejected(format!("announcement: {m}")))
        }
        Err(Refused::Full(m)) => Err(NodeError::Busy(m)),
    }
}

/// `GET /v1/servers[?model=ID]`.
#[derive(serde::Deserialize)]
pub(super) struct ListQuery {
    model: Option<String>,
}

/// The live servers, without those of keys flagged since they announced.
pub(super) fn live(s: &AppState, model: Option<&str>) -> ServerList {
    let mut list = registry(s).list(model, now_ms());
    let core = lock(&s.core);
    let flagged = |k: &str| core.worker(k).is_some_and(|w| w.flagged);
    if list.servers.iter().any(|e| flagged(&e.key)) {
        let mut reg = registry(s);
        for e in list.servers.iter().filter(|e| flagged(&e.key)) {
            reg.remove(&e.key);
        }
        list = reg.list(model, now_ms());
    }
    list
}

/// `GET /v1/servers`: live servers (of one model with `?model=`), newest first, and
/// every model's coverage of its blocks with the gaps named.
pub(super) async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Reply<impl IntoResponse> {
    if q.model.as_ref().is_some_and(|m| m.len() > MAX_MODEL_ID) {
        return Err(NodeError::Rejected(format!(
            "model ids are at most {MAX_MODEL_ID} bytes"
        )));
    }
    Ok(Json(live(&s, q.model.as_deref())))
}

/// The registry's `/metrics` lines: servers per model, uncovered blocks, servers per
/// block (for models of at most [`METRIC_BLOCKS`] blocks).
pub(super) fn metrics_text(list: &ServerList) -> String {
    let mut o = String::new();
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let _ = writeln!(
        o,
        "# HELP blocktrain_registry_servers Live block servers announced to this coordinator, per model.\n# TYPE blocktrain_registry_servers gauge"
    );
    for m in &list.models {
        let n = list
            .servers
            .iter()
            .filter(|e| e.announcement.model_id == m.model_id)
            .count();
        let _ = writeln!(
            o,
            "blocktrain_registry_servers{{model=\"{}\"}} {n}",
            esc(&m.model_id)
        );
    }
    let _ = writeln!(
        o,
        "# HELP blocktrain_registry_uncovered_blocks Blocks of a model that no live server hosts (0: a full route exists).\n# TYPE blocktrain_registry_uncovered_blocks gauge"
    );
    for m in &list.models {
        let gap: u32 = m.gaps.iter().map(|g| g.last - g.first + 1).sum();
        let _ = writeln!(
            o,
            "blocktrain_registry_uncovered_blocks{{model=\"{}\"}} {gap}",
            esc(&m.model_id)
        );
    }
    let _ = writeln!(
        o,
        "# HELP blocktrain_registry_block_servers Live servers hosting each block of a model (models of at most {METRIC_BLOCKS} blocks).\n# TYPE blocktrain_registry_block_servers gauge"
    );
    for m in list.models.iter().filter(|m| m.total <= METRIC_BLOCKS) {
        for b in &m.blocks {
            let _ = writeln!(
                o,
                "blocktrain_registry_block_servers{{model=\"{}\",block=\"{}\"}} {}",
                esc(&m.model_id),
                b.block,
                b.servers
            );
        }
    }
    o
}
