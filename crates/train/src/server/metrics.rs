//! `GET /metrics`: the run's status in the Prometheus text exposition format, plus
//! build info and the standard `process_*` metrics.
//!
//! Every series has a bounded label set (blocks, update states, byte directions): no
//! per-worker series, since worker keys are unbounded and chosen by whoever registers.
//! Worker counts are aggregates instead. Counters end in `_total`, and update states
//! are always all present (0 until the first), so rates and alerts work from the start.
use std::fmt::Write as _;

use axum::extract::State;
use axum::response::IntoResponse;

use super::{AppState, Reply};
use crate::coordinator::Status;
use crate::now_ms;

/// Update states always exposed, whether or not one has happened yet.
const UPDATE_STATES: [&str; 3] = ["applied", "pending", "rejected"];

pub(super) async fn metrics(State(st): State<AppState>) -> Reply<impl IntoResponse> {
    let snap = super::reads::snapshot(&st).await?;
    // A worker seen within one lease period is working or polling for work (lease
    // holders heartbeat every lease / 3).
    let mut text = prometheus_text(&snap.0, now_ms(), st.lease_ms);
    text.push_str(&super::servers::metrics_text(&super::servers::live(
        &st, None,
    )));
    text.push_str(&process_text());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// One metric family: its samples as (labels, value).
struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
    rows: Vec<(String, f64)>,
}

fn put(o: &mut String, f: Family) {
    let _ = writeln!(
        o,
        "# HELP {} {}\n# TYPE {} {}",
        f.name, f.help, f.name, f.kind
    );
    for (labels, v) in f.rows {
        let _ = writeln!(o, "{}{labels} {}", f.name, value(v));
    }
}

/// A sample value as Prometheus spells it (Rust writes `inf` and `NaN` differently).
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// `{k="v",...}` with values escaped as the format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

/// Renders the run's status (and build info) in the Prometheus text exposition format.
/// Workers seen within `active_ms` of `now_ms` count as active.
pub fn prometheus_text(s: &Status, now_ms: u64, active_ms: u64) -> String {
    let mut o = String::new();
    let block = |i: usize| (i + 1).to_string();
    let per_block = |f: &dyn Fn(&crate::coordinator::BlockStatus) -> f64| {
        s.blocks
            .iter()
            .map(|x| (labels(&[("block", &block(x.block))]), f(x)))
            .collect::<Vec<_>>()
    };
    put(
        &mut o,
        Family {
            name: "blocktrain_build_info",
            kind: "gauge",
            help: "Always 1; the labels say which build serves the run.",
            rows: vec![(labels(&[("version", env!("CARGO_PKG_VERSION"))]), 1.0)],
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_block_version",
            kind: "gauge",
            help: "Committed version of each block.",
            rows: per_block(&|x| x.version as f64),
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_block_steps_total",
            kind: "counter",
            help: "Local optimizer steps merged into each block.",
            rows: per_block(&|x| x.steps as f64),
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_block_stalled",
            kind: "gauge",
            help: "1 while a block is unfinished and nothing was accepted or committed for it for the stall window (nobody is advancing it).",
            rows: s
                .blocks
                .iter()
                .map(|x| (labels(&[("block", &block(x.block))]), f64::from(u8::from(x.stalled))))
                .collect(),
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_block_heldout_loss",
            kind: "gauge",
            help: "Held-out loss of each block's current version on the coordinator's screen (nats/byte; only with screening on).",
            rows: s
                .blocks
                .iter()
                .filter_map(|x| Some((labels(&[("block", &block(x.block))]), x.heldout?)))
                .collect(),
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_active_leases",
            kind: "gauge",
            help: "Leases out now, per block.",
            rows: per_block(&|x| x.active_leases as f64),
        },
    );
    let mut bytes = Vec::new();
    for x in &s.blocks {
        for (dir, v) in [("up", x.bytes_up), ("down", x.bytes_down)] {
            bytes.push((
                labels(&[("block", &block(x.block)), ("direction", dir)]),
                v as f64,
            ));
        }
    }
    put(
        &mut o,
        Family {
            name: "blocktrain_block_bytes_total",
            kind: "counter",
            help: "Bytes moved per block (up = updates, down = checkpoints).",
            rows: bytes,
        },
    );
    let mut states: Vec<&str> = UPDATE_STATES.to_vec();
    states.extend(
        s.updates
            .keys()
            .map(String::as_str)
            .filter(|k| !UPDATE_STATES.contains(k)),
    );
    states.sort();
    put(
        &mut o,
        Family {
            name: "blocktrain_updates_total",
            kind: "counter",
            help: "Updates received, by state.",
            rows: states
                .into_iter()
                .map(|k| {
                    let n = s.updates.get(k).copied().unwrap_or(0);
                    (labels(&[("state", k)]), n as f64)
                })
                .collect(),
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_workers",
            kind: "gauge",
            help: "Registered workers.",
            rows: vec![(String::new(), s.workers.len() as f64)],
        },
    );
    let active = s
        .workers
        .iter()
        .filter(|w| now_ms.saturating_sub(w.last_seen_ms) <= active_ms)
        .count();
    put(
        &mut o,
        Family {
            name: "blocktrain_active_workers",
            kind: "gauge",
            help: "Workers heard from within the last lease period.",
            rows: vec![(String::new(), active as f64)],
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_flagged_workers",
            kind: "gauge",
            help: "Workers whose updates failed a spot check.",
            rows: vec![(String::new(), s.flagged.len() as f64)],
        },
    );
    put(
        &mut o,
        Family {
            name: "blocktrain_run_done",
            kind: "gauge",
            help: "1 once every block has all its versions.",
            rows: vec![(String::new(), s.done as u8 as f64)],
        },
    );
    o
}

/// The standard `process_*` metrics of this process, read from `/proc/self` (empty
/// where there is no procfs: absent is better than wrong).
pub fn process_text() -> String {
    let mut o = String::new();
    #[cfg(target_os = "linux")]
    for (name, kind, help, v) in linux::process() {
        put(
            &mut o,
            Family {
                name,
                kind,
                help,
                rows: vec![(String::new(), v)],
            },
        );
    }
    o
}

#[cfg(target_os = "linux")]
mod linux {
    type Metric = (&'static str, &'static str, &'static str, f64);

    /// What can be read now; a metric whose file is unreadable is left out.
    pub(super) fn process() -> Vec<Metric> {
        // SAFETY: sysconf only reads a system constant.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK) as f64,
                libc::sysconf(libc::_SC_PAGESIZE) as f64,
            )
        };
        let mut out = Vec::new();
        // /proc/self/stat: fields after the parenthesised command name (which may hold
        // spaces); utime and stime are fields 14 and 15, starttime 22 (1-based).
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        if let (Some(u), Some(s), true) = (field(14), field(15), tick > 0.0) {
            out.push((
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                (u + s) / tick,
            ));
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        });
        if let (Some(boot), Some(start), true) = (boot, field(22), tick > 0.0) {
            out.push((
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + start / tick,
            ));
        }
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        if let (Some(rss), true) = (
            statm
                .split_whitespace()
                .nth(1)
                .and_then(|f| f.parse::<f64>().ok()),
            page > 0.0,
        ) {
            out.push((
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * page,
            ));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            out.push((
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                fds.count() as f64,
            ));
        }
        out
    }
}
