//! The coordinator's HTTP edge against hostile requests (issue 12): nothing written
//! before the bytes are authenticated, peer-chosen names validated before use, bounded
//! nonces, JSON errors everywhere, paged ledger reads, and a probe that stays off the
//! coordinator's own host.
use blocktrain_model::config::ModelConfig;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::signed;
use blocktrain_protocol::wire::{Lease, RegisterRequest, WorkReply, WorkerInfo};
use blocktrain_train::client::Client;
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::{Coordinator, RunInfo};
use blocktrain_train::{now_ms, server};

fn tiny() -> RunConfig {
    let mut c = RunConfig {
        blocks: 1,
        model: ModelConfig::tiny_block(),
        ..Default::default()
    };
    c.training.workers_per_block = 2;
    c.training.local_steps = 4;
    c.trust.screen_windows = 0;
    c.trust.spot_check_fraction = 0.0;
    c
}

struct Net {
    _dir: tempfile::TempDir,
    running: server::Running,
    id: Identity,
    client: Client,
}

/// A coordinator with one registered worker.
fn net() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(&dir.path().join("state"), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let id = Identity::generate();
    let mut client = Client::new(&running.url(), id.clone()).unwrap();
    let req = RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: None,
    };
    let _: RunInfo = client.post_json("/v1/register", &req).unwrap();
    Net {
        _dir: dir,
        running,
        id,
        client,
    }
}

fn lease(n: &mut Net) -> Lease {
    match n
        .client
        .post_json::<_, WorkReply>("/v1/work", &WorkerInfo::new("cpu"))
        .unwrap()
    {
        WorkReply::Lease(l) => l,
        other => panic!("{other:?}"),
    }
}

/// A request with `id`'s signature headers over `signed_body`, sending `body`, with
/// the nonce optionally replaced.
fn send(
    n: &Net,
    method: reqwest::Method,
    path: &str,
    signed_body: &[u8],
    body: &[u8],
    nonce: Option<&str>,
) -> (u16, serde_json::Value) {
    let a = signed::sign(&n.id, method.as_str(), path, now_ms(), signed_body);
    let r = reqwest::blocking::Client::new()
        .request(method, format!("{}{path}", n.running.url()))
        .header(signed::KEY_HEADER, a.key)
        .header(signed::TIME_HEADER, a.time_ms.to_string())
        .header(signed::NONCE_HEADER, nonce.unwrap_or(&a.nonce))
        .header(signed::SIG_HEADER, a.sig)
        .body(body.to_vec())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, json)
}

fn receipts(n: &Net) -> usize {
    let st = n.running.coord.lock().unwrap();
    blocktrain_train::ledger::Ledger::entries(st.conn())
        .unwrap()
        .len()
}

#[test]
fn an_unauthenticated_upload_leaves_no_row_no_traffic_and_no_receipt() {
    let mut n = net();
    let l = lease(&mut n);
    // Signed over other bytes than those sent, in the lease holder's name.
    let path = format!("/v1/updates/{}", l.id);
    let (status, body) = send(&n, reqwest::Method::POST, &path, b"x", b"garbage", None);
    assert_eq!(status, 401, "{body}");
    let s = n.running.status().unwrap();
    assert_eq!(s.updates.get("rejected").copied().unwrap_or(0), 0);
    assert_eq!(s.bytes_up, 0);
    assert!(s.recent.is_empty(), "{:?}", s.recent);
    assert_eq!(receipts(&n), 0);
    // The lease is untouched: its holder can still deliver.
    assert_eq!(s.blocks[0].active_leases, 1);
}

#[test]
fn a_non_ascii_blob_name_is_refused_not_a_panic() {
    let mut n = net();
    let l = lease(&mut n);
    // 11 ASCII bytes and a two-byte character: cutting at byte 12 would split it.
    for name in ["aaaaaaaaaaa%C3%A9", "zz", &"A".repeat(64)] {
        let path = format!("/v1/blobs/{name}");
        let (status, body) = send(&n, reqwest::Method::GET, &path, b"", b"", None);
        assert_eq!(status, 404, "{name}: {body}");
        assert!(body["error"].as_str().unwrap().contains("64 lowercase hex"));
    }
    // The server is still answering, and the real checkpoint still downloads.
    let dir = tempfile::tempdir().unwrap();
    n.client.checkpoint(&l.weights_hash, dir.path()).unwrap();
}

#[test]
fn nonces_must_be_bounded_and_non_empty() {
    let n = net();
    let body = serde_json::to_vec(&WorkerInfo::new("cpu")).unwrap();
    for nonce in ["", "short", &"n".repeat(65), "has space in it!!"] {
        let (status, reply) = send(
            &n,
            reqwest::Method::POST,
            "/v1/work",
            &body,
            &body,
            Some(nonce),
        );
        assert_eq!(status, 401, "{nonce:?}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains("x-bt-nonce"),
            "{reply}"
        );
    }
}

#[test]
fn every_error_is_the_json_error_body() {
    let n = net();
    // Bad JSON, an unknown route, a wrong method, a bad path parameter.
    let (status, reply) = send(&n, reqwest::Method::POST, "/v1/work", b"{", b"{", None);
    assert_eq!(status, 422, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("work body"));
    let http = reqwest::blocking::Client::new();
    for (method, path, want) in [
        (reqwest::Method::GET, "/v1/nothing-here", 404),
        (reqwest::Method::DELETE, "/v1/status", 405),
        (
            reqwest::Method::GET,
            "/v1/ledger/receipts/not-a-number",
            400,
        ),
        (reqwest::Method::GET, "/v1/ledger/consistency?from=x", 400),
    ] {
        let r = http
            .request(method, format!("{}{path}", n.running.url()))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/json",
            "{path}"
        );
        let v: serde_json::Value = r.json().unwrap();
        assert!(!v["error"].as_str().unwrap().is_empty(), "{path}: {v}");
    }
}

#[test]
fn ledger_receipts_come_in_pages_and_check_their_key() {
    let mut n = net();
    // Three refusals (no claim) on three leases: three receipts.
    for _ in 0..3 {
        let l = lease(&mut n);
        let path = format!("/v1/updates/{}", l.id);
        let (status, _) = send(&n, reqwest::Method::POST, &path, b"junk", b"junk", None);
        assert_eq!(status, 422);
    }
    assert_eq!(receipts(&n), 3);
    let http = reqwest::blocking::Client::new();
    let get = |q: &str| -> serde_json::Value {
        http.get(format!("{}/v1/ledger/receipts?{q}", n.running.url()))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let me = n.id.public_hex();
    let first = get(&format!("worker={me}&limit=2"));
    let page: Vec<u64> = first["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(page, vec![0, 1]);
    assert_eq!(first["next"], 1);
    let rest = get(&format!("worker={me}&limit=2&after=1"));
    assert_eq!(rest["receipts"].as_array().unwrap().len(), 1);
    assert!(rest["next"].is_null());
    let newest = get("recent=2");
    let idx: Vec<u64> = newest["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![2, 1]);
    let r = http
        .get(format!(
            "{}/v1/ledger/receipts?worker=%C3%A9",
            n.running.url()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 422);
}

#[test]
fn a_refused_lease_takes_no_second_upload_and_records_nothing_more() {
    let mut n = net();
    let l = lease(&mut n);
    let path = format!("/v1/updates/{}", l.id);
    let (status, _) = send(&n, reqwest::Method::POST, &path, b"junk", b"junk", None);
    assert_eq!(status, 422);
    for _ in 0..5 {
        let (status, reply) = send(&n, reqwest::Method::POST, &path, b"more", b"more", None);
        assert_eq!(status, 422, "{reply}");
        assert!(
            reply["error"].as_str().unwrap().contains("one upload"),
            "{reply}"
        );
    }
    assert_eq!(receipts(&n), 1, "one receipt per lease");
    let s = n.running.status().unwrap();
    assert_eq!(s.updates["rejected"], 1);
}

#[test]
fn the_probe_refuses_privileged_ports() {
    let n = net();
    let body = br#"{"port": 22}"#;
    let (status, reply) = send(&n, reqwest::Method::POST, "/v1/probe", body, body, None);
    assert_eq!(status, 422, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("1024"));
}

/// A client that sends part of a request's headers and then nothing (slowloris) is cut
/// off after the header deadline; a whole request on another connection is answered
/// meanwhile.
#[test]
fn a_request_whose_headers_trickle_is_cut_off() {
    use std::io::{Read, Write};
    let n = net();
    let mut slow = std::net::TcpStream::connect(n.running.addr).unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let t = std::time::Instant::now();
    let status: serde_json::Value =
        reqwest::blocking::get(format!("{}/v1/status", n.running.url()))
            .unwrap()
            .json()
            .unwrap();
    assert!(status["blocks"].is_array());
    let mut buf = [0u8; 1024];
    // The server answers the cut (a 408 or a bare close); the read ends either way.
    let read = slow.read(&mut buf);
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(15),
        "the half-sent request held its connection for {took:?}"
    );
    match read {
        Ok(0) => {}
        Ok(k) => assert!(
            String::from_utf8_lossy(&buf[..k]).starts_with("HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&buf[..k])
        ),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "no cut within 20 s"
        ),
    }
}

/// A coordinator that is not on loopback never probes loopback for a caller (behind a
/// local proxy every caller looks like loopback, and its own host must not be scanned);
/// one that is on loopback does (a single-machine run).
#[test]
fn the_probe_dials_loopback_only_for_a_coordinator_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(&dir.path().join("state"), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn("0.0.0.0:0".parse().unwrap(), coord).unwrap();
    let url = format!("http://127.0.0.1:{}", running.addr.port());
    let mut client = Client::new(&url, Identity::generate()).unwrap();
    let req = RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: None,
    };
    let _: RunInfo = client.post_json("/v1/register", &req).unwrap();
    let port = serde_json::json!({ "port": running.addr.port() });
    match client.post_json::<_, serde_json::Value>("/v1/probe", &port) {
        Err(blocktrain_train::NodeError::Forbidden(m)) => assert!(m.contains("loopback"), "{m}"),
        other => panic!("a loopback probe from a coordinator on 0.0.0.0: {other:?}"),
    }
    let n = net();
    let mut client = n.client;
    let port = serde_json::json!({ "port": n.running.addr.port() });
    let reply: serde_json::Value = client.post_json("/v1/probe", &port).unwrap();
    assert_eq!(reply["reachable"], true, "{reply}");
}
