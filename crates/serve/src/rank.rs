//! Choosing replicas: each stage's servers are tried in order ([`crate::hop::call_stage`]),
//! so the order is the routing decision. Routes from a registry put first the replica
//! with the least expected time for this request: the network round trip the client
//! measured plus the server's expected time in system.
//!
//! Petals routes by ping and by the throughput servers announce (Borzunov et al.,
//! "Distributed Inference and Fine-tuning of Large Language Models Over The Internet",
//! 2023). Here a server announces `W`, the mean time its recent passes took from
//! admission to result: its compute plus the queueing it had under its recent load, so
//! a busy server's `W` grows with its queue and an idle one's is its compute time. The
//! score is `rtt + W`. (`W` already holds the queueing: no queueing model is applied on
//! top of it, which would count the load twice.) Announced figures are claims: they are
//! clamped, and a server that lies about its load costs a client a slow first try at
//! most, since a failing or slow replica is passed over.
//!
//! Failover needs no separate mechanism: a replica that fails is given up on and the
//! next one tried, so a bad first choice costs one failed attempt.
use std::collections::BTreeMap;

use crate::client::Plan;

/// What a registry says of a server's load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Passes per second recently computed (shown; the score uses `pass_ms`, which
    /// already reflects the load).
    pub passes_per_s: f64,
    /// Mean time of a recent pass from admission to result (queueing included), ms.
    pub pass_ms: Option<f64>,
}

/// The longest time per pass a score counts, ms (announced figures are clamped to it).
const MAX_PASS_MS: f64 = 600_000.0;

/// Expected milliseconds a request spends on the server: round trip plus its recent
/// time per pass (see the module docs). Unknown round trips count as one second.
pub fn score(rtt_ms: Option<f64>, load: Option<&Load>) -> f64 {
    let rtt = rtt_ms
        .filter(|r| r.is_finite() && *r >= 0.0)
        .unwrap_or(1000.0);
    match load.and_then(|l| l.pass_ms) {
        Some(w) if w.is_finite() && w >= 0.0 => rtt + w.min(MAX_PASS_MS),
        _ => rtt,
    }
}

/// Orders every stage's replicas by [`score`], best first (ties keep their order).
pub fn order_replicas(plan: &mut Plan, loads: &BTreeMap<String, Load>) {
    for stage in &mut plan.stages {
        let mut scored: Vec<(f64, String)> = stage
            .replicas
            .iter()
            .map(|a| {
                let s = score(plan.latency_ms.get(a).copied(), loads.get(a));
                (s, a.clone())
            })
            .collect();
        scored.sort_by(|x, y| x.0.total_cmp(&y.0));
        stage.replicas = scored.into_iter().map(|(_, a)| a).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocktrain_protocol::frame::{BlockRange, Stage};

    fn plan(replicas: &[&str], rtts: &[f64]) -> Plan {
        Plan {
            model_id: "m".into(),
            family: "block".into(),
            total: 1,
            stages: vec![Stage {
                blocks: BlockRange { first: 1, last: 1 },
                replicas: replicas.iter().map(|s| s.to_string()).collect(),
            }],
            max_tokens: 64,
            window: 64,
            unreachable: vec![],
            latency_ms: replicas
                .iter()
                .zip(rtts)
                .map(|(a, r)| (a.to_string(), *r))
                .collect(),
        }
    }

    #[test]
    fn the_score_is_round_trip_plus_recent_time_per_pass() {
        assert_eq!(score(Some(20.0), None), 20.0);
        let busy = Load {
            passes_per_s: 5.0,
            pass_ms: Some(200.0),
        };
        assert!((score(Some(20.0), Some(&busy)) - 220.0).abs() < 1e-9);
        // Claims are clamped; nonsense is ignored.
        let absurd = Load {
            passes_per_s: 0.0,
            pass_ms: Some(1e300),
        };
        assert_eq!(score(Some(0.0), Some(&absurd)), MAX_PASS_MS);
        let nan = Load {
            passes_per_s: 0.0,
            pass_ms: Some(f64::NAN),
        };
        assert_eq!(score(Some(7.0), Some(&nan)), 7.0);
        assert_eq!(score(None, None), 1000.0);
        assert_eq!(score(Some(f64::NAN), None), 1000.0);
    }

    #[test]
    fn replicas_are_ordered_by_latency_and_load() {
        // By round trip alone: the nearest first.
        let mut p = plan(&["far:1", "near:1"], &[80.0, 10.0]);
        order_replicas(&mut p, &BTreeMap::new());
        assert_eq!(p.stages[0].replicas, vec!["near:1", "far:1"]);
        // The near one is loaded (its passes recently took 500 ms, queueing included):
        // the far idle one (80 + 50 ms) goes first.
        let mut loads = BTreeMap::new();
        loads.insert(
            "near:1".to_string(),
            Load {
                passes_per_s: 18.0,
                pass_ms: Some(500.0),
            },
        );
        loads.insert(
            "far:1".to_string(),
            Load {
                passes_per_s: 0.0,
                pass_ms: Some(50.0),
            },
        );
        order_replicas(&mut p, &loads);
        assert_eq!(p.stages[0].replicas, vec!["far:1", "near:1"]);
    }
}
