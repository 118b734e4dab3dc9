//! [`ServeError`], and the small helpers the crate's modules share.

/// Errors of serving: loading blocks, checking requests, calling stages.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad route, request, option or served directory (the caller's to fix).
    #[error("{0}")]
    Config(String),
    /// A frame or step this server's blocks refuse (wrong model, shape or size).
    #[error("rejected: {0}")]
    Rejected(String),
    /// A stage could not be reached or answered badly.
    #[error("{0}")]
    Network(String),
    /// Model or checkpoint trouble.
    #[error(transparent)]
    Model(#[from] blocktrain_model::ModelError),
    /// File system trouble, with the path.
    #[error("{path}: {error}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error (shown in the message, so not chained again).
        error: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ServeError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |error| ServeError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
