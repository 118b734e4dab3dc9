//! `GET /metrics`: the gateway's counters in the Prometheus text format.
//!
//! Label sets stay bounded whatever clients send: `endpoint` is the matched route
//! pattern (or `unmatched`), `status` a code the gateway itself answers with.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 11] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, le) in self.counts.iter_mut().zip(BUCKETS) {
            if seconds <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, le) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// The gateway's counters.
#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) -> requests answered, and their latency by endpoint.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    generations: Mutex<Histogram>,
    generated_bytes: AtomicU64,
    traversals: AtomicU64,
    choices_by_finish: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one finished generation (one choice): bytes the route produced, the
    /// traversals its servers reported, its seconds and finish reason.
    pub fn generation(&self, bytes: usize, traversals: usize, seconds: f64, finish: &'static str) {
        self.generated_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.traversals
            .fetch_add(traversals as u64, Ordering::Relaxed);
        lock(&self.generations).observe(seconds);
        *lock(&self.choices_by_finish).entry(finish).or_default() += 1;
    }

    /// The exposition; `in_flight` and `limit` are the generation slots' state now.
    pub fn render(&self, in_flight: usize, limit: usize) -> String {
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "blocktrain_gateway_requests_total",
            "counter",
            "HTTP requests answered, by route pattern and status code.",
        );
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "blocktrain_gateway_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        family(
            &mut out,
            "blocktrain_gateway_request_duration_seconds",
            "histogram",
            "Seconds from a request's arrival to its response head (a stream's head comes before its generation).",
        );
        for (endpoint, h) in lock(&self.latency).iter() {
            let labels = format!("endpoint=\"{endpoint}\"");
            h.render(
                &mut out,
                "blocktrain_gateway_request_duration_seconds",
                &labels,
            );
        }
        family(
            &mut out,
            "blocktrain_gateway_generation_duration_seconds",
            "histogram",
            "Seconds one choice took on the route, from the request sent to its last byte.",
        );
        lock(&self.generations).render(
            &mut out,
            "blocktrain_gateway_generation_duration_seconds",
            "",
        );
        family(
            &mut out,
            "blocktrain_gateway_generated_bytes_total",
            "counter",
            "Output bytes the route generated (before cutting at stop sequences).",
        );
        let bytes = self.generated_bytes.load(Ordering::Relaxed);
        let _ = writeln!(out, "blocktrain_gateway_generated_bytes_total {bytes}");
        family(
            &mut out,
            "blocktrain_gateway_traversals_total",
            "counter",
            "Traversals of the block stack, as the servers reported them.",
        );
        let t = self.traversals.load(Ordering::Relaxed);
        let _ = writeln!(out, "blocktrain_gateway_traversals_total {t}");
        family(
            &mut out,
            "blocktrain_gateway_choices_total",
            "counter",
            "Choices generated, by finish reason.",
        );
        let finished = lock(&self.choices_by_finish);
        for reason in ["length", "stop"] {
            let n = finished.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "blocktrain_gateway_choices_total{{finish_reason=\"{reason}\"}} {n}"
            );
        }
        family(
            &mut out,
            "blocktrain_gateway_generations_in_flight",
            "gauge",
            "Requests generating now.",
        );
        let _ = writeln!(out, "blocktrain_gateway_generations_in_flight {in_flight}");
        family(
            &mut out,
            "blocktrain_gateway_generations_limit",
            "gauge",
            "Requests that may generate at once (--max-concurrent); more are refused with 503.",
        );
        let _ = writeln!(out, "blocktrain_gateway_generations_limit {limit}");
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while counting leaves counts that are still counts.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Middleware: counts every response by route pattern and status, with its latency.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    *lock(&m.requests)
        .entry((endpoint.clone(), status))
        .or_default() += 1;
    lock(&m.latency)
        .entry(endpoint)
        .or_default()
        .observe(seconds);
    response
}
