//! The server registry end to end: block servers announce themselves to a coordinator
//! (`serve --registry`), `generate --registry` builds its route from the live list, a
//! dead server expires and leaves a gap the list and /metrics name, and a server the run
//! does not admit is refused at once.
use super::harness::*;

/// A coordinator with no workers: it only hosts the registry here.
struct Coordinator {
    child: Child,
    url: String,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordinator(dir: &Path, join_secret: Option<&str>) -> Coordinator {
    let state = dir.join("state");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = dir.join("run.toml");
    let secret = join_secret.map_or(String::new(), |s| {
        format!("[auth]\njoin_secret = \"{s}\"\n")
    });
    std::fs::write(
        &run,
        format!(
            "blocks = 2\ndataset = \"shakespeare\"\n{secret}\
             [model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nmlp_ratio = 2\nwindow = 32\ncausal = false\nt_cond = false\n\
             [training]\nrounds = 1\nlocal_steps = 1\nbatch = 2\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("coordinator.log")).unwrap();
    let child = Command::new(BIN)
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state")
        .arg(&state)
        .arg("--run")
        .arg(&run)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let c = Coordinator {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    wait_until(Duration::from_secs(30), "the coordinator to listen", || {
        state.join("coordinator.addr").exists()
    });
    c
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A block server of a random tiny shape, announcing itself every second.
fn announced(dir: &Path, url: &str, blocks: &str, name: &str, extra: &[&str]) -> Server {
    let key = dir.join(format!("{name}.key"));
    let mut args = vec![
        "--logical-shape",
        "d=16,layers=1,heads=2,dtype=f32",
        "--total",
        "2",
        "--max-tokens",
        "64",
        "--registry",
        url,
        "--key",
        key.to_str().unwrap(),
        "--announce-every",
        "1",
    ];
    args.extend(extra);
    serve_logical(dir, blocks, &args)
}

/// `serve --blocks BLOCKS ARGS` (no checkpoint), started as a user starts it.
fn serve_logical(dir: &Path, blocks: &str, args: &[&str]) -> Server {
    let log =
        std::fs::File::create(dir.join(format!("serve-{blocks}-{}.log", rand_suffix()))).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--blocks", blocks, "--listen", "127.0.0.1:0"])
        .args(["--threads", "1", "--keepalive-ms", "100"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    started(child, "serving")
}

fn servers(url: &str) -> serde_json::Value {
    reqwest::blocking::get(format!("{url}/v1/servers"))
        .unwrap()
        .json()
        .unwrap()
}

fn gaps(list: &serde_json::Value) -> Vec<(u64, u64)> {
    list["models"][0]["gaps"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|r| (r["first"].as_u64().unwrap(), r["last"].as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn servers_announce_clients_route_from_the_registry_and_the_dead_expire() {
    let dir = scratch("registry");
    let co = coordinator(&dir, None);
    let top = announced(&dir, &co.url, "2", "top", &[]);
    let low_a = announced(&dir, &co.url, "1", "low-a", &[]);
    let low_b = announced(&dir, &co.url, "1", "low-b", &[]);
    wait_until(Duration::from_secs(30), "three live servers", || {
        servers(&co.url)["servers"]
            .as_array()
            .is_some_and(|s| s.len() == 3)
    });
    let list = servers(&co.url);
    assert!(gaps(&list).is_empty(), "{list}");
    let per_block: Vec<u64> = list["models"][0]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["servers"].as_u64().unwrap())
        .collect();
    assert_eq!(per_block, vec![2, 1], "{list}");
    let addrs: Vec<&str> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["announcement"]["addr"].as_str().unwrap())
        .collect();
    for s in [&top, &low_a, &low_b] {
        assert!(
            addrs.contains(&s.addr.as_str()),
            "{addrs:?} lacks {}",
            s.addr
        );
    }

    // A hostile key announces the model's blocks 1..2 at block 1's server. At the
    // server's own address it is refused (the address is held by the key that announced
    // it); under another name for it, it is listed, and the client asks that address,
    // finds it answering for 1..1, leaves the lie out, and routes on.
    let model = list["models"][0]["model_id"].as_str().unwrap().to_string();
    let mut lie = blocktrain_protocol::registry::Announcement {
        model_id: model,
        family: "block".into(),
        blocks: blocktrain_protocol::frame::BlockRange { first: 1, last: 2 },
        total: 2,
        addr: low_a.addr.clone(),
        served: 0,
        passes_per_s: 0.0,
        pass_ms: Some(0.0),
        // Not renewed: it expires with the dead server below.
        ttl_secs: 5,
        join_proof: None,
    };
    let mut liar = blocktrain_train::client::Client::new(
        &co.url,
        blocktrain_protocol::identity::Identity::generate(),
    )
    .unwrap();
    let taken = liar
        .post_json::<_, serde_json::Value>("/v1/servers/announce", &lie)
        .unwrap_err();
    assert!(taken.to_string().contains("another key"), "{taken}");
    assert_eq!(servers(&co.url)["servers"].as_array().unwrap().len(), 3);
    let port = low_a.addr.rsplit_once(':').unwrap().1;
    lie.addr = format!("localhost:{port}");
    let _: serde_json::Value = liar.post_json("/v1/servers/announce", &lie).unwrap();
    assert_eq!(servers(&co.url)["servers"].as_array().unwrap().len(), 4);

    // A client builds its route from the list: one traversal, counted by the servers.
    let before = served(&top.addr);
    let out = bt(&[
        "generate",
        "--registry",
        &co.url,
        "--len",
        "8",
        "--steps-per-block",
        "2",
    ]);
    ok(&out);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains("8 bytes in") && report.contains("1 traversal of 2 stages"),
        "{report}"
    );
    assert!(
        report.contains("answers for block") && report.contains("blocks 1..1 of 2"),
        "the lie is reported as left out: {report}"
    );
    assert_eq!(served(&top.addr), before + 1);
    // Its next announcements carry the pass it measured: a mean time per pass and the
    // rate, which clients rank replicas by.
    wait_until(
        Duration::from_secs(15),
        "the top server's load figures",
        || {
            servers(&co.url)["servers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| {
                    let a = &s["announcement"];
                    a["addr"] == top.addr.as_str() && a["pass_ms"].as_f64().is_some_and(|m| m > 0.0)
                })
        },
    );

    // /metrics shows the coverage per block, as announced (the lie counts there: the
    // registry lists claims; clients check them).
    let metrics = reqwest::blocking::get(format!("{}/metrics", co.url))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("blocktrain_registry_uncovered_blocks{model=")
            && metrics.contains(",block=\"1\"} 3")
            && metrics.contains(",block=\"2\"} 2"),
        "{metrics}"
    );

    // A gateway on the registry, rebuilding its route every second.
    let (_gw, gw_url) = gateway(&co.url);
    assert_eq!(completion_status(&gw_url), 200);

    // The only server of block 2 dies: its announcement expires (3 renewals' worth, at
    // least 5 s), the list names the gap, and the client says which blocks nobody serves.
    drop(top);
    wait_until(Duration::from_secs(30), "the dead server to expire", || {
        gaps(&servers(&co.url)) == vec![(2, 2)]
    });
    let metrics = reqwest::blocking::get(format!("{}/metrics", co.url))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("blocktrain_registry_uncovered_blocks{") && l.ends_with(" 1")),
        "{metrics}"
    );
    let out = bt(&["generate", "--registry", &co.url, "--len", "8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lacks blocks 2"), "{err}");

    // A new server of block 2, at another address, announces itself: the gateway's
    // next rebuild routes through it, with no restart and no route file.
    let top2 = announced(&dir, &co.url, "2", "top2", &[]);
    wait_until(
        Duration::from_secs(30),
        "the gateway to route via the new server",
        || completion_status(&gw_url) == 200,
    );
    assert!(
        served(&top2.addr) >= 1,
        "the new server computed the request"
    );
    drop((low_a, low_b));
}

/// `gateway --registry URL --refresh 1` on a free port; returns it and its base URL.
fn gateway(registry: &str) -> (Server, String) {
    let child = Command::new(BIN)
        .args(["gateway", "--registry", registry, "--listen", "127.0.0.1:0"])
        .args([
            "--refresh",
            "1",
            "--steps-per-block",
            "2",
            "--stall-timeout",
            "3",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw = started(child, "gateway");
    let base = gw
        .addr
        .strip_suffix("/v1/completions")
        .unwrap_or_else(|| panic!("gateway printed {}", gw.addr))
        .to_string();
    (gw, base)
}

fn completion_status(base: &str) -> u16 {
    reqwest::blocking::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({"prompt": "ab", "max_tokens": 4, "temperature": 0}))
        .timeout(Duration::from_secs(20))
        .send()
        .map_or(0, |r| r.status().as_u16())
}

#[test]
fn a_server_the_run_does_not_admit_is_refused_at_once() {
    let dir = scratch("registry-refused");
    let co = coordinator(&dir, Some("s3cret"));
    let mut wrong = announced(
        &dir,
        &co.url,
        "1",
        "wrong",
        &["--registry-join-secret", "guess"],
    );
    let status = wait_exit(&mut wrong.child, Duration::from_secs(30));
    assert!(!status.success());
    let log = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("serve-1-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        log.contains("refused this server") && log.contains("join secret"),
        "{log}"
    );
    assert!(servers(&co.url)["servers"].as_array().unwrap().is_empty());
    // With the secret, the same run lists it.
    let _right = announced(
        &dir,
        &co.url,
        "1",
        "right",
        &["--registry-join-secret", "s3cret"],
    );
    wait_until(Duration::from_secs(30), "the admitted server", || {
        servers(&co.url)["servers"]
            .as_array()
            .is_some_and(|s| s.len() == 1)
    });
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "the process did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn generate_signs_with_its_key_for_servers_that_authenticate() {
    let dir = scratch("client-key");
    let id = blocktrain_protocol::identity::Identity::generate();
    let key = dir.join("client.key");
    std::fs::write(&key, format!("{}\n", hex_of(&id.secret()))).unwrap();
    let allow = dir.join("allow.txt");
    std::fs::write(&allow, format!("{}\n", id.public_hex())).unwrap();
    let server = serve_logical(
        &dir,
        "1",
        &[
            "--logical-shape",
            "d=16,layers=1,heads=2,dtype=f32",
            "--total",
            "1",
            "--max-tokens",
            "64",
            "--allow-keys",
            allow.to_str().unwrap(),
        ],
    );
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--route", &server.addr, "--len", "4"];
        args.extend(extra);
        bt(&args)
    };
    let refused = gen(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("authenticated clients only"), "{err}");
    // With the allowlisted key it runs (the servers' own count of passes, in the report;
    // an anonymous Info is refused here too).
    let signed = gen(&["--key", key.to_str().unwrap()]);
    ok(&signed);
    let report = String::from_utf8_lossy(&signed.stderr);
    assert!(report.contains("1 traversal of 1 stages"), "{report}");
    // Another key is refused as the anonymous client is.
    let other = dir.join("other.key");
    assert!(!gen(&["--key", other.to_str().unwrap()]).status.success());
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
