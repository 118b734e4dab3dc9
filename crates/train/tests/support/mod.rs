//! Test-only HTTP servers for the worker's tests: a router served on its own runtime.
#![allow(dead_code)] // each test file uses part of this

/// A router served on 127.0.0.1 until dropped.
pub struct Served {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    _rt: tokio::runtime::Runtime,
}

/// Serves `app` on a free loopback port, on a runtime of its own.
pub fn serve(app: axum::Router) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    Served { url, _rt: rt }
}

/// A `{"error": ...}` reply with `status`, as the coordinator sends.
pub fn error(status: axum::http::StatusCode, msg: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, axum::Json(serde_json::json!({ "error": msg }))).into_response()
}
