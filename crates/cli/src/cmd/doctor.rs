//! `blocktrain doctor`: checks this node before it joins, and says exactly what is wrong.
//!
//! - memory and disk free here;
//! - the coordinator: reachable, how far, and the clock difference (signed requests
//!   older than `max_skew_secs` are refused);
//! - TLS: whether the coordinator serves HTTPS, its certificate's fingerprint, and
//!   whether that passes the pin (`--tls-fingerprint`), the CA (`--tls-ca`) or the
//!   public roots; a warning for plain HTTP to a host that is not loopback;
//! - `--public-addr`: whether the coordinator can open a connection back to this host
//!   at that port (it dials only the address the request came from); when nothing
//!   listens on the port yet, the doctor listens on it for the check;
//! - `--peer`: block servers this node will forward to, asked what they host.
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use blocktrain_protocol::identity::Identity;
use blocktrain_serve::{client as infer, hop::HopLimits};
use blocktrain_train::client::Client;
use blocktrain_train::tls::{self, TlsTrust};
use clap::Args;

/// Flags of `blocktrain doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Coordinator to check (e.g. http://HOST:7700).
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The address other nodes will use to reach this one (HOST:PORT); the coordinator
    /// is asked to connect back to it.
    #[arg(long)]
    pub public_addr: Option<String>,
    /// Block servers to check (HOST:PORT; repeat the flag for several).
    #[arg(long)]
    pub peer: Vec<String>,
    /// Directory whose disk is checked (the worker cache or coordinator state).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Least free memory, GiB.
    #[arg(long, default_value_t = 1.0)]
    pub min_memory_gb: f64,
    /// Least free disk, GiB.
    #[arg(long, default_value_t = 1.0)]
    pub min_disk_gb: f64,
    /// Largest clock difference with the coordinator, seconds (its default max_skew_secs).
    #[arg(long, default_value_t = 300.0)]
    pub max_skew_secs: f64,
    /// The certificate fingerprint a worker will pin (as `worker --tls-fingerprint`).
    #[arg(long, env = "BLOCKTRAIN_TLS_FINGERPRINT", conflicts_with = "tls_ca")]
    pub tls_fingerprint: Option<String>,
    /// The CA a worker will trust (as `worker --tls-ca`).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

/// Collected results: one line per check.
#[derive(Default)]
struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: String) {
        println!("ok    {what}: {detail}");
    }

    fn warn(&mut self, what: &str, detail: String) {
        self.warned += 1;
        println!("warn  {what}: {detail}");
    }

    fn fail(&mut self, what: &str, detail: String) {
        self.failed += 1;
        println!("FAIL  {what}: {detail}");
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Runs every check that its flags ask for; exit status 1 if any failed.
pub fn run(args: DoctorArgs) -> Result<()> {
    let mut r = Report::default();
    match Some(blocktrain_train::worker::available_memory()).filter(|&b| b > 0) {
        Some(b) if b as f64 / GIB >= args.min_memory_gb => {
            r.ok("memory", format!("{:.1} GiB available", b as f64 / GIB))
        }
        Some(b) => r.fail(
            "memory",
            format!(
                "{:.2} GiB available, less than --min-memory-gb {}: close other programs or pick a smaller block",
                b as f64 / GIB,
                args.min_memory_gb
            ),
        ),
        None => r.warn("memory", "cannot read /proc/meminfo".into()),
    }
    match fs4::available_space(&args.dir) {
        Ok(b) if b as f64 / GIB >= args.min_disk_gb => r.ok(
            "disk",
            format!("{:.1} GiB free at {}", b as f64 / GIB, args.dir.display()),
        ),
        Ok(b) => r.fail(
            "disk",
            format!(
                "{:.2} GiB free at {}, less than --min-disk-gb {}: checkpoints and caches need room",
                b as f64 / GIB,
                args.dir.display(),
                args.min_disk_gb
            ),
        ),
        Err(e) => r.fail("disk", format!("{}: {e}", args.dir.display())),
    }
    if let Some(url) = &args.coordinator {
        check_coordinator(&mut r, url, &args);
    } else if args.public_addr.is_some() {
        r.fail(
            "public address",
            "needs --coordinator (the coordinator is what connects back)".into(),
        );
    }
    for peer in &args.peer {
        check_peer(&mut r, peer);
    }
    if r.failed > 0 {
        println!("{} check(s) failed", r.failed);
        std::process::exit(1);
    }
    println!("all checks passed");
    Ok(())
}

fn check_coordinator(r: &mut Report, url: &str, args: &DoctorArgs) {
    let url = url.trim_end_matches('/');
    let trust = match TlsTrust::from_flags(args.tls_fingerprint.as_deref(), args.tls_ca.as_deref())
    {
        Ok(t) => t,
        Err(e) => return r.fail("tls", e.to_string()),
    };
    if !check_tls(r, url, &trust) {
        return;
    }
    let http = match trust
        .configure(reqwest::blocking::Client::builder())
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(b.timeout(Duration::from_secs(5)).build()?))
    {
        Ok(c) => c,
        Err(e) => return r.fail("coordinator", format!("HTTP client: {e}")),
    };
    let t0 = Instant::now();
    let resp = match http.get(format!("{url}/v1/status")).send() {
        Ok(resp) => resp,
        Err(e) => {
            return r.fail(
                "coordinator",
                format!("{url} does not answer ({e}): check the URL, that it runs, and firewalls in between"),
            )
        }
    };
    let rtt = t0.elapsed();
    if !resp.status().is_success() {
        let status = resp.status();
        // A coordinator's errors are JSON with a message (e.g. "serves HTTPS only").
        let said = resp
            .json::<serde_json::Value>()
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| "is this a BlockTrain coordinator?".into());
        return r.fail(
            "coordinator",
            format!("{url}/v1/status answered {status}: {said}"),
        );
    }
    r.ok(
        "coordinator",
        format!("{url} answers in {:.0} ms", rtt.as_secs_f64() * 1e3),
    );
    // Clock: the reply's Date header (1 s resolution; signed requests allow minutes).
    let date = resp
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok());
    match date {
        Some(theirs) => {
            let now = SystemTime::now();
            let skew = match now.duration_since(theirs) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            } - rtt.as_secs_f64() / 2.0;
            if skew.abs() <= args.max_skew_secs {
                r.ok("clock", format!("{skew:+.0} s from the coordinator's"))
            } else {
                r.fail(
                    "clock",
                    format!(
                        "{skew:+.0} s from the coordinator's, more than {} s: signed requests will be refused; sync the clock (NTP)",
                        args.max_skew_secs
                    ),
                )
            }
        }
        None => r.warn("clock", "the coordinator sent no Date header".into()),
    }
    if let Some(public) = &args.public_addr {
        check_public(r, url, public, &trust);
    }
}

/// Reports plaintext or TLS, the certificate's fingerprint and whether `trust` accepts
/// it. False when the coordinator cannot be talked to the way a worker would.
fn check_tls(r: &mut Report, url: &str, trust: &TlsTrust) -> bool {
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => {
            r.fail("coordinator", format!("'{url}' is not a URL: {e}"));
            return false;
        }
    };
    let host = parsed
        .host_str()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(443);
    match parsed.scheme() {
        "http" if !trust.is_default() => {
            r.fail(
                "tls",
                format!(
                    "{} was given, but {url} is plain http://: use https://",
                    trust.describe()
                ),
            );
            false
        }
        "http" => {
            let loopback = (host.as_str(), port)
                .to_socket_addrs()
                .map(|mut a| a.all(|a| a.ip().is_loopback()))
                .unwrap_or(false);
            if loopback {
                r.ok("tls", "plaintext HTTP on loopback".into());
            } else {
                r.warn("tls", format!("plaintext HTTP to {host}, which is not loopback: requests are signed but not encrypted; ask for HTTPS (coordinator --tls-cert/--tls-key or --tls-self-signed)"));
            }
            true
        }
        "https" => match tls::inspect(&host, port, Duration::from_secs(5)) {
            Err(e) => {
                r.fail("tls", e.to_string());
                false
            }
            Ok(peer) => {
                r.ok(
                    "tls",
                    format!(
                        "{}, certificate SHA-256 fingerprint {}",
                        peer.version, peer.fingerprint
                    ),
                );
                match trust.check(&peer.chain, &host) {
                    Ok(()) => {
                        r.ok(
                            "tls trust",
                            format!("the certificate passes {}", trust.describe()),
                        );
                        true
                    }
                    Err(e) => {
                        let pin = if trust.is_default() {
                            format!(
                                " (to trust this certificate, pin it: --tls-fingerprint {})",
                                peer.fingerprint
                            )
                        } else {
                            String::new()
                        };
                        r.fail("tls trust", format!("{e}{pin}"));
                        false
                    }
                }
            }
        },
        other => {
            r.fail(
                "coordinator",
                format!("'{url}': scheme {other}, not http or https"),
            );
            false
        }
    }
}

fn check_public(r: &mut Report, url: &str, public: &str, trust: &TlsTrust) {
    let addr: Option<SocketAddr> = public.to_socket_addrs().ok().and_then(|mut a| a.next());
    let Some(addr) = addr else {
        return r.fail(
            "public address",
            format!("{public} is not HOST:PORT or does not resolve"),
        );
    };
    // Nothing serving there yet: listen for the check (the probe only connects).
    let _listener = TcpListener::bind(("0.0.0.0", addr.port())).ok();
    let mut client = match Client::with_trust(url, Identity::generate(), trust) {
        Ok(c) => c,
        Err(e) => return r.fail("public address", format!("{e}")),
    };
    let reply: serde_json::Value =
        match client.post_json("/v1/probe", &serde_json::json!({ "port": addr.port() })) {
            Ok(v) => v,
            Err(e) => return r.fail("public address", format!("probe failed: {e}")),
        };
    let seen = reply["seen_as"].as_str().unwrap_or("?").to_string();
    if reply["reachable"].as_bool() == Some(true) {
        r.ok(
            "public address",
            format!(
                "the coordinator reached {} in {:.0} ms",
                reply["target"].as_str().unwrap_or("?"),
                reply["ms"].as_f64().unwrap_or(0.0)
            ),
        );
    } else {
        r.fail(
            "public address",
            format!(
                "the coordinator cannot connect to {} ({}): open port {} in the firewall, or forward it on your NAT",
                reply["target"].as_str().unwrap_or("?"),
                reply["error"].as_str().unwrap_or("?"),
                addr.port()
            ),
        );
    }
    if seen != addr.ip().to_string() {
        r.warn(
            "public address",
            format!(
                "the coordinator sees this host as {seen}, not {}: behind NAT, give other nodes the address they can reach",
                addr.ip()
            ),
        );
    }
}

fn check_peer(r: &mut Report, peer: &str) {
    let limits = HopLimits {
        connect_timeout: Duration::from_secs(3),
        stall_timeout: Duration::from_secs(5),
        ..HopLimits::default()
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return r.fail("peer", e.to_string()),
    };
    let t0 = Instant::now();
    match rt.block_on(infer::discover(&[peer.to_string()], &limits)) {
        Ok(plan) if plan.unreachable.is_empty() => {
            let s = &plan.stages[0];
            r.ok(
                "peer",
                format!(
                    "{peer} serves {} {} of model {} ({:.0} ms)",
                    if plan.family == "ar" {
                        "layers"
                    } else {
                        "blocks"
                    },
                    s.blocks,
                    plan.model_id,
                    t0.elapsed().as_secs_f64() * 1e3
                ),
            )
        }
        // One server alone is a partial route: discover() reports what it hosts.
        Err(e) if e.to_string().contains("hosts") || e.to_string().contains("host ") => {
            r.ok("peer", format!("{peer} answers ({e})"))
        }
        Ok(plan) => r.fail("peer", plan.unreachable.join("; ")),
        Err(e) => r.fail("peer", format!("{peer}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_warned_about_off_loopback_and_a_pin_needs_https() {
        let mut r = Report::default();
        // 192.0.2.1 is TEST-NET-1: nothing is dialled for a plain URL, only resolved.
        assert!(check_tls(
            &mut r,
            "http://192.0.2.1:7700",
            &TlsTrust::default()
        ));
        assert_eq!((r.warned, r.failed), (1, 0));
        let mut r = Report::default();
        assert!(check_tls(
            &mut r,
            "http://127.0.0.1:7700",
            &TlsTrust::default()
        ));
        assert!(check_tls(
            &mut r,
            "http://localhost:7700",
            &TlsTrust::default()
        ));
        assert_eq!((r.warned, r.failed), (0, 0));
        let pin = TlsTrust::Pinned("00".repeat(32).parse().unwrap());
        assert!(!check_tls(&mut r, "http://127.0.0.1:7700", &pin));
        assert!(!check_tls(&mut r, "ftp://127.0.0.1:7700", &pin));
        assert_eq!(r.failed, 2);
    }
}
