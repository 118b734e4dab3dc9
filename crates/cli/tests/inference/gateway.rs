//! `blocktrain gateway` as OpenAI clients see it: a client for the tests (every response
//! tallied, to check `/metrics` against), the AR pipeline streaming byte by byte, and the
//! official `openai` Python client when one is installed. The block family's API tests
//! are in `gateway_api.rs`, the AR family's log-probabilities in `gateway_logprobs.rs`.
use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::harness::*;

/// A gateway process; `base` is `http://host:port`.
pub struct Gateway {
    _proc: Server,
    pub base: String,
    pub http: reqwest::blocking::Client,
    /// (route pattern, status) -> responses seen, to check `/metrics` against.
    pub seen: BTreeMap<(String, u16), u64>,
}

pub fn start_gateway(route: &str, extra: &[&str]) -> Gateway {
    let child = Command::new(BIN)
        .args(["gateway", "--route", route, "--listen", "127.0.0.1:0"])
        .args(["--steps-per-block", "4"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = started(child, "gateway");
    let base = proc
        .addr
        .strip_suffix("/v1/completions")
        .unwrap_or_else(|| panic!("gateway printed {}", proc.addr))
        .to_string();
    Gateway {
        _proc: proc,
        base,
        http: reqwest::blocking::Client::new(),
        seen: BTreeMap::new(),
    }
}

impl Gateway {
    pub fn note(&mut self, pattern: &str, status: u16) {
        *self.seen.entry((pattern.into(), status)).or_default() += 1;
    }

    /// POSTs `body` to `path` (counted under `pattern`), returns status and JSON.
    pub fn post(&mut self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        self.note(path, status);
        (status, r.json().unwrap())
    }

    pub fn get(&mut self, path: &str, pattern: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        self.note(pattern, status);
        (status, r.json().unwrap())
    }

    pub fn complete(&mut self, body: Value) -> Value {
        let (status, v) = self.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// A streamed request's data events (JSON), and whether `[DONE]` ended them.
    pub fn stream(&mut self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        self.note(path, 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let text = r.text().unwrap();
        let data: Vec<&str> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .collect();
        let done = data.last() == Some(&"[DONE]");
        let events = data
            .iter()
            .filter(|d| **d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        (events, done)
    }

    /// Error `status`, with OpenAI's error object; returns it.
    pub fn refused(&mut self, path: &str, body: &Value, status: u16) -> Value {
        let (got, v) = self.post(path, body);
        assert_eq!(got, status, "{body} -> {v}");
        error_object(v)
    }

    pub fn scrape(&mut self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().unwrap();
        self.note("/metrics", 200);
        text
    }
}

/// The `error` object of an OpenAI error body, checked for its four fields.
pub fn error_object(v: Value) -> Value {
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

pub fn text_of(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

/// An ASCII char of `s` at or past char `from`, and where it first occurs in `s`.
pub fn ascii_stop(s: &str, from: usize) -> Option<(usize, char)> {
    let (_, c) = s.char_indices().skip(from).find(|(_, c)| c.is_ascii())?;
    Some((s.find(c)?, c))
}

pub fn block_route(name: &str) -> (PathBuf, Server, Server, String) {
    let dir = scratch(name);
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let route = format!("{},{}", top.addr, bottom.addr);
    (dir, top, bottom, route)
}

pub fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        println!("skipped promtool: not on PATH (Debian: apt-get install prometheus)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}

/// The AR pipeline through the gateway: greedy equals `generate --route`, a stream
/// delivers bytes as they are sampled, and a stop sequence ends the generation early
/// (fewer traversals, counted by the servers).
#[test]
fn ar_gateway_streams_bytes_as_sampled_and_stops_early() {
    let dir = scratch("gw-ar");
    let ckpt = train(&dir, "ar");
    let servers: Vec<Server> = ["1..2", "3"]
        .iter()
        .map(|l| serve(&dir, &ckpt, l))
        .collect();
    let route = format!("{},{}", servers[0].addr, servers[1].addr);
    let mut g = start_gateway(&route, &[]);
    let greedy = json!({"prompt": "ROMEO: ", "max_tokens": 20, "temperature": 0});
    let t = text_of(&g.complete(greedy.clone()), 0);
    let direct = generate_route(
        &route,
        &["--prompt", "ROMEO: ", "--len", "20", "--top-k", "1"],
    );
    assert_eq!(ok(&direct), format!("ROMEO: {t}\n"));

    let mut body = greedy.clone();
    body["stream"] = json!(true);
    let (events, done) = g.stream("/v1/completions", &body);
    assert!(done);
    let pieces: Vec<&str> = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .filter(|p| !p.is_empty())
        .collect();
    assert_eq!(pieces.concat(), t);
    assert!(
        pieces.len() > 1,
        "the AR stream arrives in pieces: {pieces:?}"
    );
    assert!(
        pieces.iter().all(|p| p.chars().count() <= 2),
        "a byte or so at a time: {pieces:?}"
    );

    let (at, c) = ascii_stop(&t, 2).unwrap_or_else(|| panic!("no ASCII char in {t:?}"));
    let before = served(&servers[1].addr);
    let mut stopped = greedy.clone();
    stopped["stop"] = json!(c.to_string());
    let v = g.complete(stopped);
    assert_eq!(text_of(&v, 0), t[..at]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let steps = served(&servers[1].addr) - before;
    let bytes_to_stop = t[..at].len() as u64 + 1;
    assert!(
        (bytes_to_stop..=bytes_to_stop + 1).contains(&steps),
        "{steps} traversals for a stop after {bytes_to_stop} bytes (of 20)"
    );
}

/// The official `openai` Python client against real gateways (a block model's, and an
/// AR model's for logprobs): BLOCKTRAIN_OPENAI_PYTHON, else `python3` when it can import
/// `openai`; without either the test says so and passes.
#[test]
fn the_official_openai_python_client_accepts_the_gateway() {
    let python = match std::env::var("BLOCKTRAIN_OPENAI_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => "python3".to_string(),
    };
    let has = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        println!("skipped: no python with the `openai` package (set BLOCKTRAIN_OPENAI_PYTHON, or pip install openai)");
        return;
    }
    let (dir, _top, _bottom, route) = block_route("gw-python");
    let g = start_gateway(&route, &[]);
    // And an AR model's gateway, for logprobs.
    let ar = train(&dir, "ar");
    let ar_server = serve(&dir, &ar, "1..3");
    let ar_gateway = start_gateway(&ar_server.addr, &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai-client-check.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&g.base)
        .arg(&ar_gateway.base)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("ok: "), "{said}");
    assert!(said.contains("AR logprobs checks"), "{said}");
    println!("{said}");
}
