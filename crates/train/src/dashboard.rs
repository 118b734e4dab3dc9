//! The coordinator's web dashboard, served at `/`.
//!
//! One self-contained HTML page (inline CSS, JS and SVG; nothing fetched from outside,
//! so it works offline) embedded in the binary. It polls the JSON API every few seconds:
//!
//! - `GET /v1/status`: run progress, the blocks table, bytes moved per worker, recent
//!   updates;
//! - `GET /v1/history`: held-out CE per block over time, drawn as one line per block
//!   plus the total (sum of each block's latest value) on its own axis;
//! - `GET /v1/ledger/receipts?recent=20`: recent receipts, rejections highlighted with
//!   their reason.
//!
//! An endpoint that fails (a 404 from a coordinator without it) leaves its part of the
//! page on a "no ... yet" line and the rest keeps updating. Every value from the JSON
//! reaches the DOM through `textContent` or `setAttribute`, never `innerHTML`: worker
//! keys and rejection reasons are untrusted.

/// The page (`text/html`).
pub const PAGE: &str = include_str!("dashboard.html");

/// Ids of the page's main elements, stable for tests and scripts.
pub const ELEMENT_IDS: &[&str] = &[
    "run-header",
    "blocks-table",
    "ce-chart",
    "ce-legend",
    "bytes",
    "workers-table",
    "updates-table",
    "servers-table",
    "coverage",
    "receipts-table",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_its_elements() {
        for id in ELEMENT_IDS {
            assert!(PAGE.contains(&format!("id=\"{id}\"")), "missing #{id}");
        }
    }

    #[test]
    fn page_is_self_contained_and_escapes_data() {
        // Offline: no external scripts, styles or fonts (the SVG namespace is a name,
        // not a fetch).
        for bad in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "@import",
            "url(",
        ] {
            assert!(!PAGE.contains(bad), "external reference {bad:?}");
        }
        let external = PAGE
            .match_indices("http")
            .filter(|(i, _)| !PAGE[*i..].starts_with("http://www.w3.org/2000/svg"))
            .count();
        assert_eq!(external, 0, "only the SVG namespace may be a URL");
        // Data goes through textContent, never markup.
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!PAGE.contains(bad), "{bad} in the page");
        }
    }
}
