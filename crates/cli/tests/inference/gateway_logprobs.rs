//! `logprobs` through the gateway for the AR family: OpenAI's legacy completions shape
//! and chat's, holding the values the servers computed (as the client gets them
//! directly), streamed chunks carrying their own bytes', a stop cutting them with the
//! text, and the requests refused by name.
use serde_json::{json, Value};

use super::gateway::*;
use super::harness::*;

/// A token string back to its byte: ASCII as itself, else `bytes:\xNN`.
fn byte_of(token: &str) -> u8 {
    match token.strip_prefix("bytes:\\x") {
        Some(hex) => {
            let b = u8::from_str_radix(hex, 16).unwrap();
            assert!(!b.is_ascii() && hex.len() == 2, "{token:?}");
            b
        }
        None => {
            assert!(token.len() == 1 && token.is_ascii(), "{token:?}");
            token.as_bytes()[0]
        }
    }
}

fn token_of(b: u8) -> String {
    if b.is_ascii() {
        char::from(b).to_string()
    } else {
        format!("bytes:\\x{b:02x}")
    }
}

fn f(v: &Value) -> f32 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number")) as f32
}

fn near(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6
}

/// A list field of a JSON value.
fn list<'a>(v: &'a Value, field: &str) -> &'a Vec<Value> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} of {v}"))
}

/// The legacy `logprobs` of every chunk of a streamed choice, joined field by field.
fn joined_legacy(events: &[Value]) -> Value {
    let mut out =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for e in events {
        let choice = &e["choices"][0];
        let lp = &choice["logprobs"];
        if lp.is_null() {
            assert_eq!(choice["text"], "", "a piece of text without logprobs: {e}");
            continue;
        }
        let bytes: Vec<u8> = list(lp, "tokens")
            .iter()
            .map(|t| byte_of(t.as_str().unwrap()))
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            choice["text"].as_str().unwrap(),
            "a chunk's logprobs are those of its own bytes"
        );
        for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let all = out[field].as_array_mut().unwrap();
            all.extend(list(lp, field).iter().cloned());
        }
    }
    out
}

#[test]
fn ar_gateway_returns_logprobs_in_openais_shapes() {
    let dir = scratch("gw-logprobs");
    let ckpt = train(&dir, "ar");
    let servers: Vec<Server> = ["1..2", "3"]
        .iter()
        .map(|l| serve(&dir, &ckpt, l))
        .collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let mut g = start_gateway(&addrs.join(","), &[]);
    // The client's own answer from the servers, greedy as the gateway's temperature 0
    // samples (top 1, seed 0).
    let limits = HopLimits::default();
    let plan = rt().block_on(client::discover(&addrs, &limits)).unwrap();
    let direct = |prompt: &[u8], len: usize, n: u32| {
        let mut req = Request {
            prompt: prompt.to_vec(),
            len,
            seed: 0,
            ..request()
        };
        req.sampling.top_k = 1;
        rt().block_on(client::generate_ar_scored(
            &plan,
            &req,
            Some(n),
            &limits,
            &mut |_, _| true,
        ))
        .unwrap()
    };

    // /v1/completions, logprobs: 3.
    let body = json!({"prompt": "ROMEO: ", "max_tokens": 16, "temperature": 0, "logprobs": 3});
    let v = g.complete(body.clone());
    let text = text_of(&v, 0);
    let lp = &v["choices"][0]["logprobs"];
    let bytes: Vec<u8> = list(lp, "tokens")
        .iter()
        .map(|t| byte_of(t.as_str().unwrap()))
        .collect();
    let want = direct(b"ROMEO: ", 16, 3);
    assert_eq!(bytes, want.output);
    assert_eq!(String::from_utf8_lossy(&bytes), text);
    let offsets: Vec<usize> = list(lp, "text_offset")
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(offsets.len(), 16);
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1] && w[1] <= w[0] + 1));
    let chars: Vec<char> = text.chars().collect();
    for (i, (d, &b)) in want.logprobs.iter().zip(&bytes).enumerate() {
        assert!(near(f(&lp["token_logprobs"][i]), d.logprob), "byte {i}");
        // The 3 most likely bytes; greedy's byte is the first of them.
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3, "{top:?}");
        for &(t, v) in &d.top {
            assert!(near(f(&top[&token_of(t)]), v), "byte {i}: {top:?}");
        }
        assert_eq!(d.top[0].0, b);
        if b.is_ascii() {
            assert_eq!(chars[offsets[i]], char::from(b), "text_offset of byte {i}");
        }
    }

    // Streamed: the chunks' logprobs join into the same four lists.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (events, done) = g.stream("/v1/completions", &streamed);
    assert!(done);
    assert_eq!(joined_legacy(&events), *lp);
    assert!(
        events
            .iter()
            .filter(|e| !e["choices"][0]["logprobs"].is_null())
            .count()
            > 1,
        "logprobs arrive with the bytes, not at the end"
    );

    // A stop cuts the logprobs with the text (sampled: greedy output repeats a byte).
    let sampled = json!({"prompt": "ROMEO: ", "max_tokens": 24, "temperature": 1, "seed": 5,
        "logprobs": 2});
    let v = g.complete(sampled.clone());
    let lp = &v["choices"][0]["logprobs"];
    let bytes: Vec<u8> = list(lp, "tokens")
        .iter()
        .map(|t| byte_of(t.as_str().unwrap()))
        .collect();
    // An ASCII byte first seen at k >= 2: stopping at it keeps k bytes.
    let first = (2..bytes.len()).find(|&k| bytes[k].is_ascii() && !bytes[..k].contains(&bytes[k]));
    let k = first.unwrap_or_else(|| panic!("no stop to cut {bytes:?} at"));
    let mut cut = sampled.clone();
    cut["stop"] = json!(char::from(bytes[k]).to_string());
    let v = g.complete(cut.clone());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let lp_cut = &v["choices"][0]["logprobs"];
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(list(lp_cut, field)[..], list(lp, field)[..k], "{field}");
    }
    cut["stream"] = json!(true);
    let (events, _) = g.stream("/v1/completions", &cut);
    assert_eq!(joined_legacy(&events), *lp_cut);

    // n choices, sampled, logprobs: 0: each choice has its own, and each entry of
    // top_logprobs holds the sampled byte alone (OpenAI: up to logprobs + 1).
    let v = g.complete(
        json!({"prompt": "ROMEO: ", "max_tokens": 8, "temperature": 0.9,
        "seed": 3, "n": 2, "logprobs": 0}),
    );
    for i in 0..2 {
        let lp = &v["choices"][i]["logprobs"];
        let tokens = list(lp, "tokens");
        assert_eq!(tokens.len(), 8);
        for (t, (top, value)) in tokens.iter().zip(
            list(lp, "top_logprobs")
                .iter()
                .zip(list(lp, "token_logprobs")),
        ) {
            assert_eq!(*top, json!({t.as_str().unwrap(): value}));
        }
    }

    // /v1/chat/completions, logprobs: true, top_logprobs: 2.
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let chat = json!({"messages": messages, "max_tokens": 12, "temperature": 0,
        "logprobs": true, "top_logprobs": 2});
    let (s, c) = g.post("/v1/chat/completions", &chat);
    assert_eq!(s, 200, "{c}");
    let content = c["choices"][0]["message"]["content"].as_str().unwrap();
    let entries = list(&c["choices"][0]["logprobs"], "content");
    let want = direct(b"User: Hi\nAssistant:", 12, 2);
    let bytes: Vec<u8> = entries
        .iter()
        .map(|e| {
            let b = list(e, "bytes");
            assert_eq!(b.len(), 1);
            b[0].as_u64().unwrap() as u8
        })
        .collect();
    assert_eq!(String::from_utf8_lossy(&bytes), content);
    assert_eq!(
        bytes[..],
        want.output[..bytes.len()],
        "cut by a stop at most"
    );
    for (i, (e, d)) in entries.iter().zip(&want.logprobs).enumerate() {
        assert_eq!(e["token"], token_of(bytes[i]));
        assert!(near(f(&e["logprob"]), d.logprob));
        let top = list(e, "top_logprobs");
        assert_eq!(top.len(), 2);
        for (t, &(b, v)) in top.iter().zip(&d.top) {
            assert_eq!(
                *t,
                json!({"token": token_of(b), "logprob": t["logprob"], "bytes": [b]})
            );
            assert!(near(f(&t["logprob"]), v));
        }
        assert_eq!(top[0]["token"], e["token"], "greedy picks the most likely");
    }
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (events, done) = g.stream("/v1/chat/completions", &streamed);
    assert!(done);
    assert_eq!(
        events[0]["choices"][0]["logprobs"],
        Value::Null,
        "the role chunk"
    );
    let joined: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(joined, *entries);
    // logprobs: true alone: no alternatives.
    let (_, c) = g.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 3, "logprobs": true}),
    );
    let entries = list(&c["choices"][0]["logprobs"], "content");
    assert!(
        entries.iter().all(|e| list(e, "top_logprobs").is_empty()),
        "{c}"
    );

    // Refused by name, before any server computes.
    let before = served(&addrs[1]);
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 6}),
            "logprobs",
            "0..=5",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": true}),
            "logprobs",
            "integer",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": -1}),
            "logprobs",
            "integer",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 1, "echo": true}),
            "echo",
            "not scored",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_logprobs": 1}),
            "top_logprobs",
            "chat",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "logprobs": true, "top_logprobs": 6}),
            "top_logprobs",
            "0..=5",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "logprobs": false, "top_logprobs": 2}),
            "top_logprobs",
            "logprobs: true",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "logprobs": "yes"}),
            "logprobs",
            "true or false",
        ),
    ];
    for (path, body, param, needle) in cases {
        let e = g.refused(path, &body, 400);
        assert_eq!(e["param"].as_str(), Some(param), "{body}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }
    assert_eq!(
        served(&addrs[1]),
        before,
        "refused requests reach no server"
    );
}
