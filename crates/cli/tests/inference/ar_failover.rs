//! AR pipeline failover: a stage's replica killed or stopped mid-generation costs a new
//! session over the replicas left and a re-prefill of the context, not the request, and
//! the bytes are those of a run without the fault (sampling is seeded by output index),
//! and so are their log-probabilities (every generation here asks for them).
use super::harness::*;

use blocktrain_serve::client::{Generation, Plan};

/// A short output that stays inside the tiny model's window of 32 (8 context ids + 20),
/// sampled at temperature 1, so a wrong output index after a failover shows. (Lost
/// context would not: an 8-step model's bytes hardly depend on it. The hidden states
/// the servers sent show it instead.)
fn ar_request() -> Request {
    Request {
        len: 20,
        ..request()
    }
}

/// Generates over `plan` with the log-probabilities of 3 alternatives per byte, calling
/// `at(i)` after byte `i` (0-based) has arrived.
fn generate_with(
    plan: &Plan,
    limits: &HopLimits,
    at: &mut (dyn FnMut(usize) + Send),
) -> Result<Generation, blocktrain_serve::ServeError> {
    let mut n = 0;
    let mut on_byte = |_, _: Option<&_>| {
        at(n);
        n += 1;
        true
    };
    rt().block_on(client::generate_ar_scored(
        plan,
        &ar_request(),
        Some(3),
        limits,
        &mut on_byte,
    ))
}

/// A failover changes no byte, and no log-probability beyond rounding: a re-prefill sums
/// in another order than steps one at a time, and hidden states cross stages as f16.
fn same_as(g: &Generation, healthy: &Generation) {
    assert_eq!(g.output, healthy.output, "a failover changes no byte");
    assert_eq!(g.logprobs.len(), g.output.len());
    for (i, (a, b)) in g.logprobs.iter().zip(&healthy.logprobs).enumerate() {
        let near = |x: f32, y: f32| (x - y).abs() <= 1e-3;
        assert!(near(a.logprob, b.logprob), "byte {i}: {a:?} vs {b:?}");
        assert_eq!(a.top.len(), b.top.len());
        for (&(_, va), &(_, vb)) in a.top.iter().zip(&b.top) {
            assert!(near(va, vb), "byte {i}: {a:?} vs {b:?}");
        }
        // Bytes within rounding of each other may swap places: each byte in both lists
        // has the same value in both.
        for &(x, vx) in &a.top {
            if let Some(&(_, vy)) = b.top.iter().find(|&&(y, _)| y == x) {
                assert!(near(vx, vy), "byte {i}: {a:?} vs {b:?}");
            }
        }
    }
}

fn server<'a>(servers: &'a [Server], addr: &str) -> &'a Server {
    servers.iter().find(|s| s.addr == addr).unwrap()
}

#[test]
fn killed_middle_and_last_replicas_are_replayed_to_and_the_bytes_do_not_change() {
    let dir = scratch("ar-failover");
    let ckpt = train(&dir, "ar");
    // Layer 1 alone; layers 2 and 3 on two replicas each.
    let servers: Vec<Server> = ["1", "2", "2", "3", "3"]
        .iter()
        .map(|l| serve(&dir, &ckpt, l))
        .collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let limits = HopLimits::default();
    let plan = rt().block_on(client::discover(&addrs, &limits)).unwrap();
    assert_eq!(plan.family, "ar");
    let (mid, last) = (&plan.stages[1].replicas, &plan.stages[2].replicas);
    assert_eq!((mid.len(), last.len()), (2, 2), "{:?}", plan.stages);
    let passes = |a: &str| served(a);

    let healthy = generate_with(&plan, &limits, &mut |_| {}).unwrap();
    let len = ar_request().len as u64;
    assert_eq!(healthy.output.len() as u64, len);
    assert_eq!(healthy.stage_failovers, vec![0, 0, 0]);
    assert_eq!(healthy.replayed_positions, 0);
    // What a server-side replay would have kept per session: the hidden states layer 1
    // sent (f16), summed over the session's steps.
    eprintln!(
        "hidden-state history of one session at layer 1: {} bytes",
        healthy.hops[0].bytes_out
    );
    // The first replica of each stage serves; the spares have computed nothing.
    let before: Vec<u64> = addrs.iter().map(|a| passes(a)).collect();
    assert_eq!(passes(&mid[0]), len);
    assert_eq!((passes(&mid[1]), passes(&last[1])), (0, 0));

    // The middle replica in use dies after byte 5, the last stage's after byte 12.
    let (k1, k2) = (6, 13); // bytes received before each death
    let g = generate_with(&plan, &limits, &mut |i| {
        if i + 1 == k1 {
            other_kill(server(&servers, &mid[0]));
        }
        if i + 1 == k2 {
            other_kill(server(&servers, &last[0]));
        }
    })
    .unwrap();
    same_as(&g, &healthy);
    assert_eq!(g.stage_failovers, vec![0, 1, 1]);
    assert_eq!(g.entry_failovers, 0);
    // Each failover re-prefilled what the failed session had cached: the 8 context
    // ids and the bytes before the failed step, less the one that step would have sent.
    assert_eq!(g.replayed_positions, (8 + k1 - 1) + (8 + k2 - 1));
    // The servers measured the re-prefills: layers 1 and 2 sent the hidden states of the
    // whole context again (f16, d_model wide), once per failover.
    let d = rt()
        .block_on(client::server_info(&addrs[0], &limits))
        .unwrap()
        .d_model as u64;
    for stage in 0..2 {
        let extra = g.hops[stage].bytes_out - healthy.hops[stage].bytes_out;
        assert_eq!(extra, 2 * d * g.replayed_positions as u64, "stage {stage}");
    }
    // Traversals that completed; the two failed steps' partial passes show below.
    assert_eq!(g.traversals as u64, len);
    assert_eq!(
        (g.hops[1].server.as_str(), g.hops[2].server.as_str()),
        (mid[1].as_str(), last[1].as_str())
    );
    // As the servers count their passes: layer 1 computed the two failed steps again;
    // the spare of layer 2 took over at byte k1 and computed the step that layer 3's
    // death failed; the spare of layer 3 took over at byte k2.
    let delta = |a: &str| passes(a) - before[addrs.iter().position(|x| x == a).unwrap()];
    assert_eq!(delta(&plan.stages[0].replicas[0]), len + 2);
    assert_eq!(delta(&mid[1]), len - k1 as u64 + 1);
    assert_eq!(delta(&last[1]), len - k2 as u64);

    // With the stale plan (both dead replicas still first), the servers pass over the
    // dead ones when the session opens: nothing to re-prefill, the same bytes.
    let g = generate_with(&plan, &limits, &mut |_| {}).unwrap();
    same_as(&g, &healthy);
    assert_eq!(g.stage_failovers, vec![0, 1, 1]);
    assert_eq!(g.replayed_positions, 0);
    // Reported by the servers that passed over them, once per session.
    assert_eq!(
        (g.hops[0].failovers, g.hops[1].failovers),
        (1, 1),
        "{:?}",
        g.hops
    );
}

#[test]
fn a_stalled_last_stage_fails_over_and_a_stage_with_no_replica_left_is_named() {
    let dir = scratch("ar-stall");
    let ckpt = train(&dir, "ar");
    // The middle stage gives up on a silent last stage after 1 s.
    let stall = ["--stall-timeout", "1"];
    let servers: Vec<Server> = ["1", "2", "3", "3"]
        .iter()
        .map(|l| serve_with(&dir, &ckpt, l, &stall))
        .collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let limits = HopLimits::default();
    let plan = rt().block_on(client::discover(&addrs, &limits)).unwrap();
    let healthy = generate_with(&plan, &limits, &mut |_| {}).unwrap();

    // Stopped, the last stage's replica in use still holds its connections open but
    // answers nothing: a stall, not a broken connection.
    let last = plan.stages[2].replicas.clone();
    let g = generate_with(&plan, &limits, &mut |i| {
        if i == 4 {
            server(&servers, &last[0]).signal("-STOP");
        }
    })
    .unwrap();
    same_as(&g, &healthy);
    assert_eq!(g.stage_failovers, vec![0, 0, 1]);
    assert_eq!(g.replayed_positions, 8 + 4);
    assert_eq!(g.hops[2].server, last[1]);

    // The middle stage has no replica: its death ends the generation with an error
    // naming its layers and the replica that failed.
    let mid = &plan.stages[1].replicas[0];
    let e = generate_with(&plan, &limits, &mut |i| {
        if i == 2 {
            other_kill(server(&servers, mid));
        }
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("AR stage 2..2: no replica left"), "{e}");
    assert!(e.contains(mid.as_str()), "{e}");
}
