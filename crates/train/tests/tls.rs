//! The coordinator over TLS on loopback, with certificates generated here (rcgen): a
//! pinned worker trains, a wrong pin and plain HTTP fail at once with messages that
//! say what is wrong, a private CA is trusted with `--tls-ca`, `/v1/probe` still sees
//! the caller's address, and shutdown stays graceful.
use std::time::{Duration, Instant};

use blocktrain_model::config::ModelConfig;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{RegisterRequest, WorkReply, WorkerInfo, WIRE_VERSION};
use blocktrain_train::client::Client;
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::{Coordinator, RunInfo};
use blocktrain_train::now_ms;
use blocktrain_train::server::{self, Running};
use blocktrain_train::tls::{self, Fingerprint, ServerTls, TlsTrust};
use blocktrain_train::worker::{self, WorkerOptions};

fn tiny() -> RunConfig {
    let mut c = RunConfig {
        blocks: 1,
        model: ModelConfig::tiny_block(),
        ..Default::default()
    };
    c.training.local_steps = 2;
    c.training.rounds = 1;
    c.training.workers_per_block = 1;
    c
}

fn info() -> WorkerInfo {
    WorkerInfo {
        wire_version: WIRE_VERSION,
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        step_rate: None,
        data: None,
    }
}

fn register(c: &mut Client) -> blocktrain_train::Result<RunInfo> {
    c.post_json(
        "/v1/register",
        &RegisterRequest {
            info: info(),
            join_proof: None,
        },
    )
}

/// A coordinator serving HTTPS on loopback with a new self-signed certificate.
fn tls_coordinator(dir: &std::path::Path) -> Running {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let (tls, _) = ServerTls::self_signed_in(&dir.join("tls"), &names).unwrap();
    let coord = Coordinator::open(&dir.join("state"), Some(tiny()), now_ms()).unwrap();
    server::spawn_with("127.0.0.1:0".parse().unwrap(), coord, Some(tls)).unwrap()
}

#[test]
fn a_pinned_client_registers_gets_work_and_downloads_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let running = tls_coordinator(dir.path());
    assert!(
        running.url().starts_with("https://127.0.0.1:"),
        "{}",
        running.url()
    );
    let pin = TlsTrust::Pinned(running.fingerprint().unwrap());
    let mut c = Client::with_trust(&running.url(), Identity::generate(), &pin).unwrap();
    let run = register(&mut c).unwrap();
    assert!(!run.codec.is_empty());
    let lease = match c.post_json::<_, WorkReply>("/v1/work", &info()).unwrap() {
        WorkReply::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    let blob = c
        .checkpoint(&lease.weights_hash, &dir.path().join("cache"))
        .unwrap();
    assert!(blob.len() > 1000 && c.bytes_down == blob.len() as u64);

    // ConnectInfo still reaches /v1/probe under TLS: it dials the caller's address.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let reply: serde_json::Value = c
        .post_json("/v1/probe", &serde_json::json!({ "port": port }))
        .unwrap();
    assert_eq!(reply["seen_as"], "127.0.0.1", "{reply}");
    assert_eq!(reply["reachable"], true, "{reply}");

    // Graceful shutdown with the client's keep-alive connection still open.
    let t0 = Instant::now();
    running.stop().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn a_worker_pinned_to_the_certificate_trains_and_a_wrong_pin_stops_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let running = tls_coordinator(dir.path());
    let opts = |tls: TlsTrust, name: &str| WorkerOptions {
        coordinator: running.url(),
        key: dir.path().join(format!("{name}.key")),
        data: None,
        cache: dir.path().join(format!("{name}-cache")),
        device: tch::Device::Cpu,
        join_secret: None,
        max_leases: Some(1),
        retry_for: Duration::from_secs(600),
        malice: None,
        tls,
    };
    let wrong = Fingerprint([7; 32]);
    let t0 = Instant::now();
    let e = worker::run(&opts(TlsTrust::Pinned(wrong), "wrong")).unwrap_err();
    let msg = e.to_string();
    let right = running.fingerprint().unwrap();
    assert!(
        msg.contains(&right.to_string()),
        "names what was presented: {msg}"
    );
    assert!(msg.contains(&wrong.to_string()), "names the pin: {msg}");
    assert!(msg.contains("pinned"), "{msg}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "no retrying a bad pin"
    );
    assert!(running.status().unwrap().workers.is_empty());

    let summary = worker::run(&opts(TlsTrust::Pinned(right), "right")).unwrap();
    assert_eq!(summary.accepted, 1, "{summary:?}");
    assert_eq!(running.status().unwrap().workers.len(), 1);
}

#[test]
fn plain_http_against_the_tls_port_is_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let running = tls_coordinator(dir.path());
    let plain = format!("http://{}", running.addr);
    let mut c = Client::new(&plain, Identity::generate()).unwrap();
    let t0 = Instant::now();
    let e = register(&mut c).unwrap_err().to_string();
    assert!(
        e.contains("serves HTTPS only") && e.contains("https://"),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "answered, not retried"
    );
    // Unsigned reads too (what a browser or curl would see).
    let r = reqwest::blocking::get(format!("{plain}/v1/status")).unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().unwrap().contains("use https://"));
    // And the server keeps serving TLS afterwards.
    let pin = TlsTrust::Pinned(running.fingerprint().unwrap());
    let mut c = Client::with_trust(&running.url(), Identity::generate(), &pin).unwrap();
    register(&mut c).unwrap();
}

#[test]
fn a_self_signed_certificate_is_not_trusted_by_the_public_roots() {
    let dir = tempfile::tempdir().unwrap();
    let running = tls_coordinator(dir.path());
    let mut c = Client::new(&running.url(), Identity::generate()).unwrap();
    let t0 = Instant::now();
    let e = register(&mut c).unwrap_err().to_string();
    assert!(
        e.contains("not from a trusted CA") && e.contains("--tls-fingerprint"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_pin_on_a_plaintext_url_is_refused() {
    let e = Client::with_trust(
        "http://127.0.0.1:1",
        Identity::generate(),
        &TlsTrust::Pinned(Fingerprint([1; 32])),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("use https://"), "{e}");
}

#[test]
fn https_against_a_plain_http_coordinator_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let url = format!("https://{}", running.addr);
    let pin = TlsTrust::Pinned(Fingerprint([1; 32]));
    let mut c = Client::with_trust(&url, Identity::generate(), &pin).unwrap();
    let e = register(&mut c).unwrap_err().to_string();
    assert!(e.contains("plain HTTP"), "{e}");
}

/// A private CA and a leaf it issued for 127.0.0.1 (PEM): what `--tls-ca` is for.
fn private_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

#[test]
fn a_private_ca_is_trusted_with_tls_ca_and_checked_by_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca();
    let tls = ServerTls::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let coord = Coordinator::open(dir.path(), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn_with("127.0.0.1:0".parse().unwrap(), coord, Some(tls)).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let trust = TlsTrust::from_flags(None, Some(&ca_file)).unwrap();
    let mut c = Client::with_trust(&running.url(), Identity::generate(), &trust).unwrap();
    register(&mut c).unwrap();

    // What `blocktrain doctor` does: look at the certificate, then judge it.
    let peer = tls::inspect("127.0.0.1", running.addr.port(), Duration::from_secs(5)).unwrap();
    assert_eq!(Some(peer.fingerprint), running.fingerprint());
    assert!(trust.check(&peer.chain, "127.0.0.1").is_ok());
    let e = TlsTrust::PublicRoots
        .check(&peer.chain, "127.0.0.1")
        .unwrap_err();
    assert!(e.contains("not from a trusted CA"), "{e}");
    assert!(TlsTrust::Pinned(peer.fingerprint)
        .check(&peer.chain, "127.0.0.1")
        .is_ok());
    let e = TlsTrust::Pinned(Fingerprint([2; 32]))
        .check(&peer.chain, "127.0.0.1")
        .unwrap_err();
    assert!(e.contains(&peer.fingerprint.to_string()), "{e}");
    // The CA's leaf names 127.0.0.1 only.
    let e = trust.check(&peer.chain, "localhost").unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");
}
