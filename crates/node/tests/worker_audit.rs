//! The worker's checks of what a coordinator tells it, against a fake coordinator that
//! can lie: checkpoint names that are not hashes.
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use blocktrain_node::client::Client;
use blocktrain_protocol::identity::Identity;

mod support;
use support::serve;

fn client(url: &str, id: &Identity) -> Client {
    let mut c = Client::new(url, id.clone()).unwrap();
    c.retry_for = Duration::from_secs(1);
    c
}

#[test]
fn checkpoint_names_that_are_not_blake3_hex_are_refused_before_any_use() {
    let served = serve(
        Router::new().fallback(|| async { (StatusCode::OK, "not the checkpoint you asked for") }),
    );
    let mut c = client(&served.url, &Identity::generate());
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("a/cache");
    for bad in [
        "abc".to_string(),
        "../../escape".to_string(),
        format!("../{}", "a".repeat(61)),
        "AB".repeat(32),
        format!("{}g", "a".repeat(63)),
        "é".repeat(32), // 64 bytes, not 64 digits
        String::new(),
    ] {
        let e = c.checkpoint(&bad, &cache).unwrap_err().to_string();
        assert!(e.contains("not a blake3 hash"), "{bad:?}: {e}");
    }
    // Nothing was written, in the cache or beside it.
    let written: Vec<_> = walk(root.path());
    assert!(written.is_empty(), "{written:?}");
    // A well-formed hash is fetched and, not matching its bytes, refused as corrupt.
    let e = c.checkpoint(&"ab".repeat(32), &cache).unwrap_err();
    assert!(
        e.to_string().contains("could not be downloaded intact"),
        "{e}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        match p.is_dir() {
            true => out.extend(walk(&p)),
            false => out.push(p),
        }
    }
    out
}
