//! `GET /metrics`: the run's status in the Prometheus text exposition format.
use std::fmt::Write as _;

use axum::extract::State;
use axum::response::IntoResponse;

use super::{AppState, Reply};
use crate::coordinator::{short, Status};

pub(super) async fn metrics(State(st): State<AppState>) -> Reply<impl IntoResponse> {
    let snap = super::reads::snapshot(&st).await?;
    let s = &snap.0;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        prometheus_text(s),
    ))
}

/// Renders the status in the Prometheus text exposition format.
pub fn prometheus_text(s: &Status) -> String {
    let mut o = String::new();
    let mut put = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let b = |i: usize| format!("block=\"{}\"", i + 1);
    put(
        "blocktrain_block_version",
        "gauge",
        "Committed version of each block.",
        s.blocks
            .iter()
            .map(|x| (format!("{{{}}}", b(x.block)), x.version as f64))
            .collect(),
    );
    put(
        "blocktrain_block_steps",
        "counter",
        "Local optimizer steps merged into each block.",
        s.blocks
            .iter()
            .map(|x| (format!("{{{}}}", b(x.block)), x.steps as f64))
            .collect(),
    );
    put(
        "blocktrain_active_leases",
        "gauge",
        "Leases out now, per block.",
        s.blocks
            .iter()
            .map(|x| (format!("{{{}}}", b(x.block)), x.active_leases as f64))
            .collect(),
    );
    let mut bytes = Vec::new();
    for x in &s.blocks {
        bytes.push((
            format!("{{{},direction=\"up\"}}", b(x.block)),
            x.bytes_up as f64,
        ));
        bytes.push((
            format!("{{{},direction=\"down\"}}", b(x.block)),
            x.bytes_down as f64,
        ));
    }
    put(
        "blocktrain_block_bytes_total",
        "counter",
        "Bytes moved per block (up = updates, down = checkpoints).",
        bytes,
    );
    let mut wb = Vec::new();
    for w in &s.workers {
        wb.push((
            format!("{{worker=\"{}\",direction=\"up\"}}", short(&w.key)),
            w.bytes_up as f64,
        ));
        wb.push((
            format!("{{worker=\"{}\",direction=\"down\"}}", short(&w.key)),
            w.bytes_down as f64,
        ));
    }
    put(
        "blocktrain_worker_bytes_total",
        "counter",
        "Bytes moved per worker.",
        wb,
    );
    let mut states: Vec<_> = s.updates.iter().collect();
    states.sort();
    put(
        "blocktrain_updates_total",
        "counter",
        "Updates received, by state.",
        states
            .into_iter()
            .map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64))
            .collect(),
    );
    put(
        "blocktrain_workers",
        "gauge",
        "Registered workers.",
        vec![(String::new(), s.workers.len() as f64)],
    );
    put(
        "blocktrain_run_done",
        "gauge",
        "1 once every block has all its versions.",
        vec![(String::new(), s.done as u8 as f64)],
    );
    o
}
