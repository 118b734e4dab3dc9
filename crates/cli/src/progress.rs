//! Progress bars for long work (hidden when stderr is not a terminal, so logs stay clean).
use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `total` units of `what`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
        )
        .expect("valid template"),
    );
    pb.set_prefix(what.to_string());
    pb
}
