//! TLS and exposure as an operator meets them: `coordinator --tls-self-signed` prints the
//! fingerprint a worker pins, a worker with a wrong pin stops at once naming both, one
//! with the right pin trains the run to the end, the doctor reports the certificate; an open run off loopback is refused
//! unless `--open-registration`, and plain HTTP there is warned about.
use super::harness::*;

/// Waits for `needle` in `dir/name` and returns the log.
fn wait_log(dir: &Path, name: &str, needle: &str) -> String {
    wait_for(Duration::from_secs(30), needle, || {
        read(dir, name).contains(needle)
    });
    read(dir, name)
}

fn coordinator_with(dir: &Path, listen: &str, run: &Path, extra: &[&str]) -> Proc {
    let log = log_file(dir, "coordinator.log");
    let child = Command::new(BIN)
        .args(["coordinator", "--listen", listen, "--exit-when-done"])
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--run")
        .arg(run)
        .args(extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

#[test]
fn a_self_signed_coordinator_trains_pinned_workers_and_refuses_a_wrong_pin() {
    let dir = scratch("tls");
    let run = run_toml(&dir, 1, 1, 1, 1, "");
    let port = free_port();
    let mut coord = coordinator_with(
        &dir,
        &format!("127.0.0.1:{port}"),
        &run,
        &["--tls-self-signed"],
    );
    let log = wait_log(&dir, "coordinator.log", "--tls-fingerprint ");
    let fp = log
        .split("--tls-fingerprint ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect::<String>();
    assert_eq!(fp.len(), 64, "{log}");
    assert!(
        log.contains(&format!("coordinator on https://127.0.0.1:{port}")),
        "{log}"
    );
    assert!(dir.join("state/tls-cert.pem").exists());
    let url = format!("https://127.0.0.1:{port}");

    // The doctor shows the fingerprint, and whether the pin or the public roots pass it.
    let doctor = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["doctor", "--coordinator", &url])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, text) = doctor(&["--tls-fingerprint", &fp]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "ok    tls: TLSv1_3, certificate SHA-256 fingerprint {fp}"
        )),
        "{text}"
    );
    assert!(
        text.contains("ok    tls trust") && text.contains("ok    coordinator"),
        "{text}"
    );
    let (ok, text) = doctor(&[]);
    assert!(
        !ok && text.contains("FAIL  tls trust")
            && text.contains(&format!("--tls-fingerprint {fp}")),
        "{text}"
    );

    let wrong = "ab".repeat(32);
    let mut w = worker(&dir, &url, "wrong", &["--tls-fingerprint", &wrong]);
    let st = wait_exit(&mut w, Duration::from_secs(20));
    let text = read(&dir, "wrong.log");
    assert!(!st.success(), "{text}");
    assert!(text.contains(&fp) && text.contains(&wrong), "{text}");

    let mut w = worker(&dir, &url, "right", &["--tls-fingerprint", &fp]);
    assert!(
        wait_exit(&mut w, Duration::from_secs(90)).success(),
        "{}",
        read(&dir, "right.log")
    );
    assert!(
        read(&dir, "right.log").contains("1 updates accepted"),
        "{}",
        read(&dir, "right.log")
    );
    assert!(wait_exit(&mut coord, Duration::from_secs(60)).success());
    assert_eq!(
        versions(&dir.join("state")).len(),
        2,
        "version 0 and the merged 1"
    );
}

#[test]
fn an_open_run_off_loopback_needs_open_registration_and_plain_http_is_warned_about() {
    let dir = scratch("exposure");
    let run = run_toml(&dir, 1, 1, 1, 1, "");
    let out = Command::new(BIN)
        .args(["coordinator", "--listen", "0.0.0.0:0", "--run"])
        .arg(&run)
        .arg("--state")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("refusing to serve") && text.contains("--open-registration"),
        "{text}"
    );
    assert!(
        !dir.join("state").exists(),
        "a refused start leaves no state"
    );

    let _coord = coordinator_with(&dir, "0.0.0.0:0", &run, &["--open-registration"]);
    let log = wait_log(&dir, "coordinator.log", "warning:");
    assert!(
        log.contains("plain HTTP") && log.contains("--tls-self-signed"),
        "{log}"
    );

    // A join secret is enough to serve off loopback (plain HTTP still warned about).
    let dir = scratch("exposure-secret");
    let run = run_toml(&dir, 1, 1, 1, 1, "[auth]\njoin_secret = \"s3cret\"");
    let _coord = coordinator_with(&dir, "0.0.0.0:0", &run, &[]);
    let log = wait_log(&dir, "coordinator.log", "warning:");
    assert!(!log.contains("refusing"), "{log}");
}
