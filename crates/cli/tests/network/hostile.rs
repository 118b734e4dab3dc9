//! Hand-made requests from a hostile or broken worker: clear errors, state intact.
use super::harness::*;

/// A hand-made signed request: what a hostile or broken worker can send.
fn signed_post(
    url: &str,
    id: &Identity,
    path: &str,
    body: &[u8],
    tamper: bool,
) -> reqwest::blocking::Response {
    let auth = signed::sign(id, "POST", path, blocktrain_train::now_ms(), body);
    let mut body = body.to_vec();
    if tamper {
        body.push(b' ');
    }
    reqwest::blocking::Client::new()
        .post(format!("{url}{path}"))
        .header(signed::KEY_HEADER, auth.key)
        .header(signed::TIME_HEADER, auth.time_ms.to_string())
        .header(signed::NONCE_HEADER, auth.nonce)
        .header(signed::SIG_HEADER, auth.sig)
        .body(body)
        .send()
        .unwrap()
}

/// Sends a request head with `id`'s signature headers (over an empty body) declaring
/// `declared` body bytes, then `body`; returns the reply.
fn raw_post(url: &str, id: &Identity, path: &str, declared: u64, body: &[u8]) -> String {
    use std::io::Read;
    let mut tcp = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    let a = signed::sign(id, "POST", path, blocktrain_train::now_ms(), b"");
    let sig = format!(
        "{}: {}\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\n",
        signed::KEY_HEADER,
        a.key,
        signed::TIME_HEADER,
        a.time_ms,
        signed::NONCE_HEADER,
        a.nonce,
        signed::SIG_HEADER,
        a.sig
    );
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: x\r\n{sig}content-length: {declared}\r\n\r\n"
    )
    .unwrap();
    tcp.write_all(body).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tcp.read(&mut reply).unwrap_or(0);
    String::from_utf8_lossy(&reply[..n]).to_string()
}

fn info() -> WorkerInfo {
    WorkerInfo::new("cpu")
}

#[test]
fn hostile_requests_get_clear_errors_and_leave_checkpoints_intact() {
    let dir = scratch("hostile");
    let run = run_toml(&dir, 1, 1, 5, 1, "[auth]\njoin_secret = \"open sesame\"");
    let (_coord, url) = coordinator(&dir, free_port(), Some(&run));
    let weights_before = status(&url).unwrap().blocks[0].weights.clone();

    // Unsigned, and signed by a key that never registered.
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/work"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("not signed"));
    let stranger = Identity::generate();
    let body = serde_json::to_vec(&info()).unwrap();
    let r = signed_post(&url, &stranger, "/v1/work", &body, false);
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("register first"));
    // Without the join secret, and with a body that does not match its signature.
    let reg = |proof: Option<String>| {
        serde_json::to_vec(&RegisterRequest {
            info: info(),
            join_proof: proof,
        })
        .unwrap()
    };
    let r = signed_post(&url, &stranger, "/v1/register", &reg(None), false);
    assert_eq!(r.status(), 403);
    assert!(r.text().unwrap().contains("join secret"));
    let id = Identity::generate();
    let proof = Some(blocktrain_protocol::wire::join_proof(
        "open sesame",
        &id.public_hex(),
    ));
    assert_eq!(
        signed_post(&url, &id, "/v1/register", &reg(proof.clone()), true).status(),
        401
    );
    assert!(signed_post(&url, &id, "/v1/register", &reg(proof), false)
        .status()
        .is_success());

    // The same signed request sent twice: the copy is a replay.
    let replay = |auth: &signed::Auth| {
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/work"))
            .header(signed::KEY_HEADER, &auth.key)
            .header(signed::TIME_HEADER, auth.time_ms.to_string())
            .header(signed::NONCE_HEADER, &auth.nonce)
            .header(signed::SIG_HEADER, &auth.sig)
            .body(body.clone())
            .send()
            .unwrap()
    };
    let once = signed::sign(&id, "POST", "/v1/work", blocktrain_train::now_ms(), &body);
    assert!(replay(&once).status().is_success());
    let r = replay(&once);
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("replayed"));
    let lease: Lease = match signed_post(&url, &id, "/v1/work", &body, false)
        .json()
        .unwrap()
    {
        WorkReply::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    let path = format!("/v1/updates/{}", lease.id);
    // Garbage, a bad signature, an oversized declared body, and an upload cut off mid-way.
    let r = signed_post(&url, &id, &path, b"not safetensors", false);
    assert_eq!(r.status(), 422);
    assert_eq!(signed_post(&url, &id, &path, b"x", true).status(), 401);
    let reply = raw_post(&url, &id, &path, 999_999_999, &[0u8; 16]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // The uploader dies mid-body: 1000 of 100000 bytes, then the connection closes.
    let mut tcp = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    let a = signed::sign(&id, "POST", &path, blocktrain_train::now_ms(), b"");
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: x\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\ncontent-length: 100000\r\n\r\n",
        signed::KEY_HEADER, a.key, signed::TIME_HEADER, a.time_ms, signed::NONCE_HEADER, a.nonce, signed::SIG_HEADER, a.sig
    )
    .unwrap();
    tcp.write_all(&[7u8; 1000]).unwrap();
    drop(tcp);

    // Only the authenticated upload is on record (the first, refused for its missing
    // claim, which closed the lease); the forged, oversized and cut-off ones left no
    // row, no byte count and no receipt in the worker's name.
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&url).unwrap();
    let reasons: Vec<String> = s.recent.iter().filter_map(|u| u.reason.clone()).collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("claim"), "{reasons:?}");
    assert_eq!(
        s.bytes_up,
        b"not safetensors".len() as u64,
        "only the authenticated upload's bytes are counted"
    );
    let s = status(&url).unwrap();
    assert_eq!(
        s.blocks[0].weights, weights_before,
        "stored checkpoint untouched"
    );
    assert_eq!(s.blocks[0].version, 0);

    // A real worker without the secret is refused with a message that says so.
    let mut w = worker(&dir, &url, "nosecret", &[]);
    assert!(!wait_exit(&mut w, Duration::from_secs(30)).success());
    assert!(read(&dir, "nosecret.log").contains("join secret"));
    // With it, the run completes.
    let mut w = worker(&dir, &url, "member", &["--join-secret", "open sesame"]);
    assert!(
        wait_exit(&mut w, Duration::from_secs(60)).success(),
        "{}",
        read(&dir, "member.log")
    );
}
