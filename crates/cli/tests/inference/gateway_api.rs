//! The block family through `blocktrain gateway`: completions' OpenAI semantics and
//! refusals, then streams, chat, CORS, the concurrency limit, health and metrics.
use serde_json::{json, Value};

use super::gateway::*;
use super::harness::*;

#[test]
fn completions_follow_openai_semantics_and_refuse_in_its_error_shape() {
    let (_dir, top, _bottom, route) = block_route("gw-complete");
    let mut g = start_gateway(&route, &[]);
    let (s, models) = g.get("/v1/models", "/v1/models");
    assert_eq!(s, 200);
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let (s, m) = g.get(&format!("/v1/models/{model}"), "/v1/models/{*id}");
    assert_eq!((s, m["id"].as_str()), (200, Some(model.as_str())));
    let (s, v) = g.get("/v1/models/gpt-4", "/v1/models/{*id}");
    assert_eq!(
        (s, error_object(v)["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let e = g.refused(
        "/v1/completions",
        &json!({"model": "gpt-4", "prompt": "x"}),
        404,
    );
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );

    // Greedy is deterministic without a seed (the unmasking order is drawn from it).
    let greedy = json!({"model": model, "prompt": "ROMEO: ", "max_tokens": 24, "temperature": 0});
    let t = text_of(&g.complete(greedy.clone()), 0);
    assert_eq!(text_of(&g.complete(greedy.clone()), 0), t);
    let sampled = json!({"prompt": "ROMEO: ", "max_tokens": 24, "temperature": 0.9, "seed": 11});
    let s11 = text_of(&g.complete(sampled.clone()), 0);
    assert_eq!(text_of(&g.complete(sampled), 0), s11);
    // top_p reaches the servers' samplers: a nucleus this small holds the likeliest byte
    // only, so at any temperature it samples what greedy samples with the same seed.
    let nucleus = json!({"prompt": "ROMEO: ", "max_tokens": 24, "temperature": 0.9,
        "top_p": 0.001, "seed": 0});
    assert_eq!(text_of(&g.complete(nucleus), 0), t);
    let one = |g: &mut Gateway, prompt: &str, seed: u64| {
        let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "seed": seed});
        text_of(&g.complete(body), 0)
    };
    let want = [
        one(&mut g, "ROMEO: ", 11),
        one(&mut g, "ROMEO: ", 12),
        one(&mut g, "JULIET: ", 11),
        one(&mut g, "JULIET: ", 12),
    ];

    // A list prompt with n = 2: prompt-major, choice j samples with seed + j (greedy: an
    // untrained model's sampled bytes hardly depend on the prompt).
    let v = g.complete(
        json!({"prompt": ["ROMEO: ", "JULIET: "], "n": 2, "max_tokens": 24,
        "temperature": 0, "seed": 11}),
    );
    let indices: Vec<u64> = (0..4)
        .map(|i| v["choices"][i]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    let texts: Vec<String> = (0..4).map(|i| text_of(&v, i)).collect();
    assert_eq!(texts, want);
    // Greedy still depends on the prompt and on the seed (its unmasking order), so the
    // comparison tells the orders apart.
    let distinct: std::collections::HashSet<&String> = want.iter().collect();
    assert_eq!(distinct.len(), 4, "{want:?}");
    assert_eq!(v["usage"]["prompt_tokens"], 7 + 8);
    assert_eq!(v["usage"]["completion_tokens"], 4 * 24);
    // Token ids are bytes: the same prompt as ids samples the same.
    let ids: Vec<u8> = b"ROMEO: ".to_vec();
    let v = g.complete(json!({"prompt": ids, "max_tokens": 24, "temperature": 0}));
    assert_eq!(text_of(&v, 0), t);

    // stop: cut before the first occurrence, finish_reason stop; echo prepends the prompt.
    let (at, c) = ascii_stop(&t, 3).unwrap_or_else(|| panic!("no ASCII char in {t:?}"));
    let mut stopped = greedy.clone();
    stopped["stop"] = json!([c.to_string(), "\u{1}never"]);
    let v = g.complete(stopped.clone());
    assert_eq!(
        (text_of(&v, 0), v["choices"][0]["finish_reason"].as_str()),
        (t[..at].to_string(), Some("stop"))
    );
    assert_eq!(
        g.complete(greedy.clone())["choices"][0]["finish_reason"],
        "length"
    );
    let mut echo = greedy.clone();
    echo["echo"] = json!(true);
    assert_eq!(text_of(&g.complete(echo), 0), format!("ROMEO: {t}"));

    // Refusals: each names its field; none is a plain-text 422.
    let served_before = served(&top.addr);
    let cases = [
        (
            json!({"prompt": "x", "max_tokens": 4096}),
            "max_tokens",
            "positions",
        ),
        (
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
            "at least 1",
        ),
        (json!({"prompt": "x", "n": 9}), "n", "1..=8"),
        (json!({"prompt": vec!["a"; 9], "n": 2}), "n", "16 choices"),
        (
            json!({"prompt": "x", "logprobs": 1}),
            "logprobs",
            "diffusion",
        ),
        (json!({"prompt": "x", "top_p": 0}), "top_p", "(0, 1]"),
        (json!({"prompt": "x", "top_p": 1.5}), "top_p", "(0, 1]"),
        (
            json!({"prompt": "x", "temperature": 3}),
            "temperature",
            "0..=2",
        ),
        (
            json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
            "at most 4",
        ),
        (json!({"prompt": [300]}), "prompt", "not a byte"),
        (
            json!({"prompt": "x", "max_tokens": "ten"}),
            "max_tokens",
            "invalid type",
        ),
        (json!({"prompt": "x", "messages": []}), "messages", "chat"),
        (json!({"max_tokens": 3}), "prompt", "required"),
    ];
    for (body, param, needle) in cases {
        let e = g.refused("/v1/completions", &body, 400);
        assert_eq!(e["param"].as_str(), Some(param), "{body}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }
    let e = g.refused("/v1/completions", &json!({"prompt": "x", "bogus": 1}), 400);
    assert!(
        e["message"].as_str().unwrap().contains("unknown field"),
        "{e}"
    );
    assert_eq!(
        served(&top.addr),
        served_before,
        "refused requests reach no server"
    );

    // Bodies that are not JSON, not declared JSON, or too large; unknown routes and
    // methods: all in OpenAI's shape.
    let raw = |g: &mut Gateway, ct: &str, body: Vec<u8>| {
        let r = g
            .http
            .post(format!("{}/v1/completions", g.base))
            .header("content-type", ct)
            .body(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        g.note("/v1/completions", status);
        (status, error_object(r.json().unwrap()))
    };
    let (s, e) = raw(&mut g, "application/json", b"{\"prompt\": ".to_vec());
    assert_eq!(s, 400);
    assert!(
        e["message"].as_str().unwrap().contains("not valid JSON"),
        "{e}"
    );
    let (s, _) = raw(
        &mut g,
        "application/x-www-form-urlencoded",
        b"prompt=x".to_vec(),
    );
    assert_eq!(s, 415);
    let huge = format!("{{\"prompt\": \"{}\"}}", "a".repeat(2 << 20)).into_bytes();
    // The gateway answers before reading such a body and closes the connection: this
    // request gets a client of its own, so the shared one's pool is not left broken.
    let pooled = std::mem::replace(&mut g.http, reqwest::blocking::Client::new());
    let (s, e) = raw(&mut g, "application/json", huge);
    g.http = pooled;
    assert_eq!(s, 413);
    assert!(e["message"].as_str().unwrap().contains("limit"), "{e}");
    let (s, v) = g.post("/v1/engines", &json!({}));
    g.seen.remove(&("/v1/engines".to_string(), s));
    g.note("unmatched", s);
    assert_eq!(s, 404);
    assert!(error_object(v)["message"]
        .as_str()
        .unwrap()
        .contains("/v1/engines"));
    let (s, v) = g.get("/v1/completions", "/v1/completions");
    assert_eq!(s, 405);
    error_object(v);
    let r = g
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/completions", g.base),
        )
        .header("origin", "http://ui.example")
        .header("access-control-request-method", "POST")
        .send()
        .unwrap();
    g.note("/v1/completions", r.status().as_u16());
    assert_eq!(r.status(), 405, "no CORS unless --cors-origin");
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn streams_chat_health_and_metrics_agree_with_plain_answers() {
    let (_dir, top, bottom, route) = block_route("gw-stream");
    let mut g = start_gateway(
        &route,
        &[
            "--max-concurrent",
            "1",
            "--cors-origin",
            "http://ui.example",
        ],
    );
    let greedy = json!({"prompt": "ROMEO: ", "max_tokens": 24, "temperature": 0});
    let plain = g.complete(greedy.clone());
    let t = text_of(&plain, 0);
    let mut completion_bytes = plain["usage"]["completion_tokens"].as_u64().unwrap();
    let mut seed1 = greedy.clone();
    seed1["seed"] = json!(1);
    let t1 = text_of(&g.complete(seed1), 0);
    completion_bytes += 24;

    // Completions stream: the pieces make the plain text, the last choice chunk says
    // length, usage comes last when asked for, then [DONE].
    let mut body = greedy.clone();
    body["stream"] = json!(true);
    body["n"] = json!(2);
    body["stream_options"] = json!({"include_usage": true});
    let (events, done) = g.stream("/v1/completions", &body);
    assert!(done);
    for index in 0..2 {
        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| e["choices"][0]["index"] == index)
            .collect();
        let joined: String = mine
            .iter()
            .map(|e| e["choices"][0]["text"].as_str().unwrap())
            .collect();
        // Choice j samples with seed + j (seed 0 at temperature 0 when none is given).
        assert_eq!(&joined, if index == 0 { &t } else { &t1 });
        assert_eq!(
            mine.last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );
        assert!(mine.iter().all(|e| e["object"] == "text_completion"));
    }
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(events.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], 48);
    completion_bytes += 48;

    // Chat: the template's text through /v1/completions with the turn stop samples the
    // same reply as /v1/chat/completions.
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let chat = json!({"messages": messages, "max_tokens": 20, "temperature": 0});
    let (s, c) = g.post("/v1/chat/completions", &chat);
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    let reply = c["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    completion_bytes += c["usage"]["completion_tokens"].as_u64().unwrap();
    let templated = g.complete(json!({"prompt": "System: Be brief.\nUser: Hi\nAssistant:",
        "max_tokens": 20, "temperature": 0, "stop": "\nUser:"}));
    completion_bytes += 20;
    assert_eq!(text_of(&templated, 0), reply);
    assert_eq!(
        c["usage"]["prompt_tokens"],
        templated["usage"]["prompt_tokens"]
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (events, done) = g.stream("/v1/chat/completions", &streamed);
    completion_bytes += 20;
    assert!(done);
    assert!(events
        .iter()
        .all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, reply);
    assert!(events.last().unwrap()["choices"][0]["finish_reason"].is_string());
    let e = g.refused(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "tool", "content": "x"}]}),
        400,
    );
    assert_eq!(e["param"], "messages[0].role");
    // A diffusion traversal has no per-byte likelihood: chat's logprobs are refused too,
    // saying why, however they are asked for.
    for body in [
        json!({"messages": messages.clone(), "logprobs": true}),
        json!({"messages": messages.clone(), "logprobs": true, "top_logprobs": 2}),
        json!({"messages": messages.clone(), "top_logprobs": 0}),
    ] {
        let e = g.refused("/v1/chat/completions", &body, 400);
        assert_eq!(e["param"], "logprobs", "{body}: {e}");
        let m = e["message"].as_str().unwrap();
        assert!(
            m.contains("diffusion") && m.contains("per-byte likelihood"),
            "{e}"
        );
    }
    // logprobs: false and null ask for nothing.
    for off in [json!(false), Value::Null] {
        let body = json!({"messages": messages.clone(), "max_tokens": 2, "logprobs": off});
        let (s, c) = g.post("/v1/chat/completions", &body);
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["choices"][0]["logprobs"], Value::Null);
        completion_bytes += c["usage"]["completion_tokens"].as_u64().unwrap();
    }

    // CORS as configured: preflights answered for the origin given, not for others.
    let preflight = |origin: &str| {
        g.http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", g.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
            .unwrap()
    };
    let ok = preflight("http://ui.example");
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://ui.example"
    );
    assert!(preflight("http://evil.example")
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let (s, h) = g.get("/health", "/health");
    assert_eq!((s, &h["ok"]), (200, &json!(true)), "{h}");
    assert_eq!(h["stages"].as_array().unwrap().len(), 2);
    assert!(
        h["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["answering"] == 1),
        "{h}"
    );

    // One generation at a time: with the bottom server stopped the first request waits,
    // the second is refused at once with 503 in OpenAI's shape, the first then finishes.
    bottom.signal("-STOP");
    let (base, waiting_body) = (g.base.clone(), greedy.clone());
    let waiting = std::thread::spawn(move || {
        let r = reqwest::blocking::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(&waiting_body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    });
    let started = std::time::Instant::now();
    while !g
        .scrape()
        .contains("blocktrain_gateway_generations_in_flight 1")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never in flight"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = g.refused("/v1/completions", &greedy, 503);
    assert_eq!(e["code"], "server_overloaded");
    assert!(e["message"].as_str().unwrap().contains("--max-concurrent"));
    bottom.signal("-CONT");
    let (s, v) = waiting.join().unwrap();
    assert_eq!((s, text_of(&v, 0)), (200, t.clone()));
    g.note("/v1/completions", 200);
    completion_bytes += 24;

    // /metrics counts what this test saw: every response by route and status, the
    // bytes generated, and the traversals the servers counted.
    let text = g.scrape();
    for ((pattern, status), n) in &g.seen {
        let series = format!(
            "blocktrain_gateway_requests_total{{endpoint=\"{pattern}\",status=\"{status}\"}} "
        );
        let line = text.lines().find(|l| l.starts_with(&series));
        let counted = line.map(|l| l[series.len()..].to_string());
        // The last scrape is not in its own answer.
        let expect = if pattern == "/metrics" { n - 1 } else { *n };
        assert_eq!(counted, Some(expect.to_string()), "{series}\n{text}");
    }
    let value = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(
        value("blocktrain_gateway_generated_bytes_total"),
        completion_bytes
    );
    assert_eq!(
        value("blocktrain_gateway_traversals_total"),
        served(&top.addr)
    );
    assert!(text.contains("blocktrain_gateway_request_duration_seconds_bucket{endpoint=\"/v1/completions\",le=\"+Inf\"}"));
    promtool_check(&text);

    // A stage with no answering replica: /health says which, generation is a 502.
    drop(bottom);
    std::thread::sleep(Duration::from_millis(2100)); // past the health answer's reuse
    let (s, h) = g.get("/health", "/health");
    assert_eq!((s, &h["ok"]), (503, &json!(false)), "{h}");
    let down: Vec<&Value> = h["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["answering"] == 0)
        .collect();
    assert_eq!(down.len(), 1);
    assert_eq!(down[0]["blocks"], "1..2");
    let e = g.refused("/v1/completions", &greedy, 502);
    assert_eq!(e["type"], "server_error");
}
