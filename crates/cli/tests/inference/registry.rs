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
        "--registry-key",
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
    let mut child = Command::new(BIN)
        .args(["serve", "--blocks", blocks, "--listen", "127.0.0.1:0"])
        .args(["--threads", "1", "--keepalive-ms", "100"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|_| line.starts_with("serving"))
        .unwrap_or_else(|| panic!("server did not start: {line:?}"))
        .to_string();
    Server { child, addr }
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

    // /metrics shows the coverage per block.
    let metrics = reqwest::blocking::get(format!("{}/metrics", co.url))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("blocktrain_registry_uncovered_blocks{model=")
            && metrics.contains(",block=\"1\"} 2"),
        "{metrics}"
    );

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
    drop((low_a, low_b));
}

#[test]
fn a_server_the_run_does_not_admit_is_refused_at_once() {
    let dir = scratch("registry-refused");
    let co = coordinator(&dir, Some("s3cret"));
    let mut wrong = announced(&dir, &co.url, "1", "wrong", &["--join-secret", "guess"]);
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
    let _right = announced(&dir, &co.url, "1", "right", &["--join-secret", "s3cret"]);
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
