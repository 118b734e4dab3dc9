//! Faults and hostile peers: stalled, dead and killed replicas, hand-made bad frames.
use super::harness::*;

#[test]
fn stalled_and_dead_replicas_are_skipped_and_the_last_failure_names_the_blocks() {
    let dir = scratch("faults");
    let ckpt = train(&dir, "block");
    // The top stage gives up on a silent replica after 1.5 s.
    let top = serve_with(&dir, &ckpt, "3..4", &["--stall-timeout", "1.5"]);
    let first = serve(&dir, &ckpt, "1..2");
    let second = serve(&dir, &ckpt, "1..2");
    let limits = HopLimits {
        stall_timeout: Duration::from_millis(1500),
        ..HopLimits::default()
    };
    let servers = vec![top.addr.clone(), first.addr.clone(), second.addr.clone()];
    let rt = rt();
    let plan = rt.block_on(client::discover(&servers, &limits)).unwrap();
    assert_eq!(plan.stages.len(), 2);
    assert_eq!(
        plan.stages[1].replicas.len(),
        2,
        "two replicas of blocks 1..2"
    );
    let healthy = rt
        .block_on(client::generate(&plan, &request(), &limits))
        .unwrap();
    assert_eq!(healthy.hops[0].failovers, 0);

    // Whichever replica is tried first stalls (stopped: the kernel still accepts its
    // connections, nothing answers). The top stage gives up on it and uses the other.
    let tried_first = plan.stages[1].replicas[0].clone();
    let (stalled, other) = if tried_first == first.addr {
        (&first, &second)
    } else {
        (&second, &first)
    };
    stalled.signal("-STOP");
    let g = rt
        .block_on(client::generate(&plan, &request(), &limits))
        .unwrap();
    assert_eq!(
        g.output, healthy.output,
        "the replica computes the same bytes"
    );
    assert_eq!(g.hops[0].failovers, 1, "{:?}", g.hops);
    assert_eq!(g.hops[1].server, other.addr);

    // With the other replica dead too, the error names the blocks nobody served.
    other_kill(other);
    let e = rt
        .block_on(client::generate(&plan, &request(), &limits))
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocks 1..2"), "{e}");
    assert!(e.contains("stalled") && e.contains("connect"), "{e}");
    // The top server is fine after all that.
    let info = rt.block_on(client::discover(std::slice::from_ref(&top.addr), &limits));
    assert!(info
        .unwrap_err()
        .to_string()
        .contains("no server hosts blocks 1..2"));
}

#[test]
fn hostile_frames_get_errors_and_the_server_keeps_serving() {
    let dir = scratch("hostile");
    let ckpt = train(&dir, "block");
    let s = serve(&dir, &ckpt, "1..4");
    let info = match raw(&s.addr, &Message::Info.encode()) {
        Message::ServerInfo(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!((info.total, info.blocks.first, info.blocks.last), (4, 1, 4));

    expect_error(
        raw(&s.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ErrorCode::BadRequest,
        "magic",
    );
    let mut huge = Message::Info.encode();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_error(raw(&s.addr, &huge), ErrorCode::BadRequest, "exceeds");
    let mut future = Message::Info.encode();
    future[4] = 2;
    expect_error(raw(&s.addr, &future), ErrorCode::BadRequest, "version 2");
    // A frame cut off mid-payload, then the connection dropped.
    {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        let f = Message::Denoise(
            meta(&info.model_id, "1..4", &s.addr),
            vec![1, 2, MASK_TOKEN],
        )
        .encode();
        c.write_all(&f[..f.len() - 2]).unwrap();
    }

    let tokens = vec![b'a' as u16, MASK_TOKEN, MASK_TOKEN];
    let m = meta("not-this-model", "1..4", &s.addr);
    expect_error(
        raw(&s.addr, &Message::Denoise(m, tokens.clone()).encode()),
        ErrorCode::Mismatch,
        "model",
    );
    let m = meta(&info.model_id, "1..2", &s.addr);
    expect_error(
        raw(&s.addr, &Message::Denoise(m, tokens.clone()).encode()),
        ErrorCode::Mismatch,
        "hosts blocks 1..4",
    );
    let mut m = meta(&info.model_id, "1..4", &s.addr);
    m.sampling.temperature = -1.0;
    expect_error(
        raw(&s.addr, &Message::Denoise(m, tokens.clone()).encode()),
        ErrorCode::BadRequest,
        "temperature",
    );
    let m = meta(&info.model_id, "1..4", &s.addr);
    let long = vec![MASK_TOKEN; 5000];
    expect_error(
        raw(&s.addr, &Message::Denoise(m, long).encode()),
        ErrorCode::BadRequest,
        "tokens",
    );
    assert!(matches!(
        raw(
            &s.addr,
            &[MAGIC.as_slice(), &[1, 0, 5, 0], &[0; 8]].concat()
        ),
        Message::Error(_)
    ));

    // Block numbers out of range never get as far as the route check.
    let bytes = Message::Denoise(meta(&info.model_id, "1..4", &s.addr), tokens.clone()).encode();
    let meta_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let (head, rest) = bytes.split_at(16);
    let (json, body) = rest.split_at(meta_len);
    let json = String::from_utf8(json.to_vec())
        .unwrap()
        .replace(r#""last":4"#, r#""last":4294967295"#);
    let mut bytes = head.to_vec();
    bytes[8..12].copy_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(body);
    expect_error(raw(&s.addr, &bytes), ErrorCode::BadRequest, "block range");
    // An AR step to a diffusion server is refused, not misread.
    let m = meta(&info.model_id, "1..4", &s.addr);
    let ar = Message::ArStep(
        ArStepMeta {
            session: 1,
            output_index: 0,
            hidden: Some((1, 16)),
            setup: Some(ArSetup {
                model_id: info.model_id.clone(),
                sampling: m.sampling,
                seed: 0,
                route: m.route,
                hop: 0,
                logprobs: None,
            }),
        },
        ArPayload::Hidden(vec![0.5; 16]),
    );
    expect_error(
        raw(&s.addr, &ar.encode()),
        ErrorCode::BadRequest,
        "diffusion blocks",
    );

    // After all that, a good request still works.
    let m = meta(&info.model_id, "1..4", &s.addr);
    match raw(&s.addr, &Message::Denoise(m, tokens).encode()) {
        Message::Result(_, bytes) => assert_eq!(bytes.len(), 3),
        other => panic!("{other:?}"),
    }
    assert!(s.addr.contains("127.0.0.1"));
}

#[test]
fn a_replica_killed_mid_request_is_replaced_and_the_request_completes() {
    let dir = scratch("midkill");
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let a = serve(&dir, &ckpt, "1..2");
    let b = serve(&dir, &ckpt, "1..2");
    let limits = HopLimits::default();
    let servers = vec![top.addr.clone(), a.addr.clone(), b.addr.clone()];
    let rt = rt();
    let plan = rt.block_on(client::discover(&servers, &limits)).unwrap();
    // A long output and many steps, so that blocks 1..2 compute for a while (a step
    // that reveals nothing is skipped, hence both).
    let mut req = request();
    req.len = 600;
    req.sampling.steps_per_block = 600;
    let expected = rt.block_on(client::generate(&plan, &req, &limits)).unwrap();
    let busy = if plan.stages[1].replicas[0] == a.addr {
        &a
    } else {
        &b
    };
    let worker = std::thread::spawn({
        let (plan, req, limits) = (plan.clone(), req.clone(), limits.clone());
        move || rt.block_on(client::generate(&plan, &req, &limits))
    });
    // Wait until the request has reached blocks 1..2 (top's share is done), then kill.
    // Killed a little early instead (still computing the top), the replica is refused at
    // connect: a failover either way. The kill lands 40% into blocks 1..2's compute as
    // measured on this machine, so it is not too late on a faster one either.
    let (top_s, bottom_s) = (
        expected.hops[0].compute_ms / 1e3,
        expected.hops[1].compute_ms / 1e3,
    );
    std::thread::sleep(Duration::from_secs_f64(top_s + 0.4 * bottom_s));
    busy.signal("-KILL");
    let g = worker.join().unwrap().unwrap();
    assert_eq!(g.output, expected.output);
    assert_eq!(g.hops[0].failovers, 1, "{:?}", g.hops);
}
