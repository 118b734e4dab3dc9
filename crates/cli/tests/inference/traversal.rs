//! One traversal across servers: both diffusion families, the AR pipeline, the gateway.
use super::harness::*;

#[test]
fn one_traversal_over_two_servers_matches_local_generation() {
    let dir = scratch("match");
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let local = generate_local(&ckpt, &GEN);
    // The route file lists servers in any order; what each hosts is asked over the wire.
    let route = dir.join("route.txt");
    std::fs::write(
        &route,
        format!("# servers\n{}\n{}\n", bottom.addr, top.addr),
    )
    .unwrap();
    let out = generate_route(route.to_str().unwrap(), &GEN);
    assert_eq!(
        ok(&out),
        local,
        "the block stack across servers samples what one host samples"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 traversal"), "{err}");
    assert!(err.contains("3..4") && err.contains("1..2"), "{err}");
    // Counted by the servers: each computed once for that request. What crossed the one
    // hop between them was a byte per position plus the mask bitmap.
    assert_eq!((served(&top.addr), served(&bottom.addr)), (1, 1));
    let g = rt()
        .block_on(async {
            let limits = HopLimits::default();
            let plan = client::discover(&[top.addr.clone(), bottom.addr.clone()], &limits).await?;
            client::generate(&plan, &request(), &limits).await
        })
        .unwrap();
    assert_eq!(g.traversals, 1);
    assert_eq!((served(&top.addr), served(&bottom.addr)), (2, 2));
    let n: usize = 7 + 24;
    assert_eq!(g.hops[0].bytes_out, (n + n.div_ceil(8)) as u64);
    assert_eq!(g.hops[1].bytes_out, 0, "the last stage sends nothing on");

    // A route that misses blocks is refused before anything is sent, naming them.
    let out = generate_route(&top.addr, &GEN);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no server hosts blocks 1..2"), "{err}");
}

/// The paper's family across servers: the latent z crosses the hop as f16 (T x e values
/// at the boundary's sigma), one host and the route sample the same bytes, the servers
/// count one pass each, and the gateway serves it too.
#[test]
fn edm_blocks_across_two_servers_hand_on_the_latent_once() {
    let dir = scratch("edm");
    let ckpt = train(&dir, "edm");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let route = format!("{},{}", bottom.addr, top.addr);
    let local = generate_local(&ckpt, &GEN);
    let out = generate_route(&route, &GEN);
    assert_eq!(ok(&out), local, "the route samples what one host samples");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 traversal"), "{err}");
    let heun: Vec<&str> = GEN.iter().copied().chain(["--heun"]).collect();
    assert_eq!(
        ok(&generate_route(&route, &heun)),
        generate_local(&ckpt, &heun)
    );
    assert_eq!((served(&top.addr), served(&bottom.addr)), (2, 2));
    let g = rt()
        .block_on(async {
            let limits = HopLimits::default();
            let plan = client::discover(&[top.addr.clone(), bottom.addr.clone()], &limits).await?;
            assert_eq!(plan.family, "edm");
            client::generate(&plan, &request(), &limits).await
        })
        .unwrap();
    assert_eq!(g.output.len(), 24);
    assert_eq!(g.traversals, 1);
    let n: usize = 7 + 24;
    assert_eq!(
        g.hops[0].bytes_out,
        (n + n.div_ceil(8) + 2 * n * EMBED_DIM) as u64,
        "tokens + mask + an f16 latent of {n} x {EMBED_DIM}"
    );
    // A latent sent to the top stage, or none to a lower one, is refused.
    let info = match raw(&bottom.addr, &Message::Info.encode()) {
        Message::ServerInfo(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(info.family, "edm");
    let tokens: Vec<u16> = b"Hi"
        .iter()
        .map(|&b| b as u16)
        .chain([MASK_TOKEN; 6])
        .collect();
    let mut m = meta(&info.model_id, "1..2", &bottom.addr);
    m.route.insert(
        0,
        Stage {
            blocks: "3..4".parse().unwrap(),
            replicas: vec![top.addr.clone()],
        },
    );
    m.hop = 1;
    expect_error(
        raw(
            &bottom.addr,
            &Message::Denoise(m.clone(), tokens.clone()).encode(),
        ),
        ErrorCode::BadRequest,
        "continue from a latent",
    );
    let z = blocktrain_protocol::frame::LatentState {
        width: EMBED_DIM as u32,
        sigma: 10.0,
        values: vec![0.0; tokens.len() * EMBED_DIM],
    };
    let mut to_top = m.clone();
    to_top.hop = 0;
    expect_error(
        raw(
            &top.addr,
            &Message::Latent(to_top, tokens.clone(), z.clone()).encode(),
        ),
        ErrorCode::BadRequest,
        "takes no latent",
    );
    // A latent at another level than where this stage starts is refused too.
    let wrong = blocktrain_protocol::frame::LatentState { sigma: 7.0, ..z };
    expect_error(
        raw(&bottom.addr, &Message::Latent(m, tokens, wrong).encode()),
        ErrorCode::BadRequest,
        "start at sigma",
    );
    let gateway = start_gateway(&route);
    let http = reqwest::blocking::Client::new();
    let body = serde_json::json!({"prompt": "ROMEO: ", "max_tokens": 10, "seed": 3});
    let r = http.post(&gateway.addr).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 10);
}

#[test]
fn ar_pipeline_over_three_servers_matches_local_greedy_generation() {
    let dir = scratch("ar");
    let ckpt = train(&dir, "ar");
    let servers: Vec<Server> = ["1", "2", "3"]
        .iter()
        .map(|l| serve(&dir, &ckpt, l))
        .collect();
    let route: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    let route = route.join(",");
    // 48 bytes after a 7-byte prompt outgrow the window of 32: the session restarts from
    // the last 16 ids twice, as local generation rebuilds its cache.
    let greedy = ["--prompt", "ROMEO: ", "--len", "48", "--top-k", "1"];
    let local = generate_local(&ckpt, &greedy);
    let out = generate_route(&route, &greedy);
    assert_eq!(ok(&out), local);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("48 traversals"), "{err}");
    for s in &servers {
        assert_eq!(served(&s.addr), 48, "one pass of every stage per byte");
    }

    // A dead middle stage with no replica is a clear error naming its layers (failover
    // to replicas is ar_failover.rs's).
    servers[1].signal("-KILL");
    std::thread::sleep(Duration::from_millis(200));
    let out = generate_route(&route, &greedy);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2..2"), "{err}");
}

/// `blocktrain gateway` in front of `route`, 4 steps per block; its address is the
/// completions URL it prints.
fn start_gateway(route: &str) -> Server {
    let mut child = Command::new(BIN)
        .args([
            "gateway",
            "--route",
            route,
            "--listen",
            "127.0.0.1:0",
            "--steps-per-block",
            "4",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let gateway = Server {
        addr: line.trim().rsplit(' ').next().unwrap().to_string(),
        child,
    };
    assert!(gateway.addr.ends_with("/v1/completions"), "{line}");
    gateway
}

#[test]
fn openai_style_completions_go_through_the_gateway() {
    let dir = scratch("gateway");
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let route = format!("{},{}", top.addr, bottom.addr);
    let gateway = start_gateway(&route);
    let http = reqwest::blocking::Client::new();
    let body =
        serde_json::json!({"prompt": "ROMEO: ", "max_tokens": 12, "temperature": 0.8, "seed": 3});
    let r = http.post(&gateway.addr).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The same seed through the gateway samples what generate --route samples.
    let direct = generate_route(
        &route,
        &[
            "--prompt",
            "ROMEO: ",
            "--len",
            "12",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--steps-per-block",
            "4",
        ],
    );
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(ok(&direct), format!("ROMEO: {text}\n"));
    // Bad requests get a 400 with an OpenAI-style error body.
    let r = http
        .post(&gateway.addr)
        .json(&serde_json::json!({"prompt": "x", "max_tokens": 100000}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("positions"),
        "{v}"
    );
}
