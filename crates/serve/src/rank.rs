//! Choosing replicas: each stage's servers are tried in order ([`crate::hop::call_stage`]),
//! so the order is the routing decision. Routes from a registry put first the replica
//! with the least expected time for this request: the network round trip the client
//! measured plus the server's expected time in system.
//!
//! Petals routes by ping and by the throughput servers announce (Borzunov et al.,
//! "Distributed Inference and Fine-tuning of Large Language Models Over The Internet",
//! 2023). Here a server announces its recent passes per second `λ` and its mean compute
//! time per pass `S`, so its utilisation is `ρ = λ·S` and, treating it as an M/M/1
//! queue, a new request spends `S / (1 − ρ)` there (waiting and computing). The score is
//! `rtt + S / (1 − ρ)`, with `ρ` capped below 1 so an overloaded server ranks last rather
//! than at infinity. A server without load figures scores its round trip alone.
//!
//! Failover needs no separate mechanism: a replica that fails is given up on and the
//! next one tried, so a bad first choice costs one failed attempt.
use std::collections::BTreeMap;

use crate::client::Plan;

/// What a registry says of a server's load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Passes per second recently computed.
    pub passes_per_s: f64,
    /// Mean compute time of one pass, ms.
    pub pass_ms: Option<f64>,
}

/// Utilisation at most this, for the score (an overloaded server ranks last, finitely).
const MAX_UTILISATION: f64 = 0.95;

/// Expected milliseconds a request spends on the server at `addr`: round trip plus time
/// in system (see the module docs). Unknown round trips count as one second.
pub fn score(rtt_ms: Option<f64>, load: Option<&Load>) -> f64 {
    let rtt = rtt_ms
        .filter(|r| r.is_finite() && *r >= 0.0)
        .unwrap_or(1000.0);
    let Some(Load {
        passes_per_s,
        pass_ms: Some(s),
    }) = load.copied()
    else {
        return rtt;
    };
    if !(s.is_finite() && s >= 0.0 && passes_per_s.is_finite() && passes_per_s >= 0.0) {
        return rtt;
    }
    let rho = (passes_per_s * s / 1000.0).min(MAX_UTILISATION);
    rtt + s / (1.0 - rho)
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
    fn the_score_is_round_trip_plus_time_in_system() {
        assert_eq!(score(Some(20.0), None), 20.0);
        // λ = 5/s, S = 100 ms: ρ = 0.5, time in system 200 ms.
        let busy = Load {
            passes_per_s: 5.0,
            pass_ms: Some(100.0),
        };
        assert!((score(Some(20.0), Some(&busy)) - 220.0).abs() < 1e-9);
        // Idle: the compute time alone.
        let idle = Load {
            passes_per_s: 0.0,
            pass_ms: Some(100.0),
        };
        assert!((score(Some(20.0), Some(&idle)) - 120.0).abs() < 1e-9);
        // Overloaded: finite, capped at ρ = 0.95 (S / 0.05 = 20 S).
        let over = Load {
            passes_per_s: 50.0,
            pass_ms: Some(100.0),
        };
        assert!((score(Some(0.0), Some(&over)) - 2000.0).abs() < 1e-6);
        assert_eq!(score(None, None), 1000.0);
        assert_eq!(score(Some(f64::NAN), None), 1000.0);
    }

    #[test]
    fn replicas_are_ordered_by_latency_and_load() {
        // By round trip alone: the nearest first.
        let mut p = plan(&["far:1", "near:1"], &[80.0, 10.0]);
        order_replicas(&mut p, &BTreeMap::new());
        assert_eq!(p.stages[0].replicas, vec!["near:1", "far:1"]);
        // The near one is loaded (ρ = 0.9, S = 50 ms: 500 ms in system): the far idle
        // one (80 + 50 ms) goes first.
        let mut loads = BTreeMap::new();
        loads.insert(
            "near:1".to_string(),
            Load {
                passes_per_s: 18.0,
                pass_ms: Some(50.0),
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
