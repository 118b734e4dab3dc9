//! A server forwards only to servers of its model: never the request's bytes to
//! anything else.
use std::sync::atomic::Ordering;
use std::time::Duration;

use blocktrain_protocol::frame::ErrorCode;
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::server::ServeOptions;

use super::support::*;

#[test]
fn routes_naming_non_servers_or_other_models_are_refused_and_nothing_reaches_them() {
    // The top stage gives up on a silent replica after 1 s.
    let top = Srv::new(
        "2..2",
        0,
        ServeOptions {
            limits: HopLimits {
                stall_timeout: Duration::from_secs(1),
                ..HopLimits::default()
            },
            keepalive: Duration::from_millis(100),
            ..ServeOptions::default()
        },
    );
    let bottom = Srv::new("1..1", 0, ServeOptions::default());
    let rt = rt();
    rt.block_on(async {
        let limits = HopLimits::default();
        // The honest route works.
        let ok = call(&top.model, route(&[&top.addr], &[&bottom.addr]), &limits).await;
        expect_ok(&ok);

        // Something that is no block server (a silent service, and one that speaks
        // first like sshd): connected to, refused, and sent nothing.
        let silent = Fake::start(None).await;
        let a = call(&top.model, route(&[&top.addr], &[&silent.addr]), &limits).await;
        expect_err(&a.message, ErrorCode::Unavailable, "no greeting");
        assert!(silent.connected.load(Ordering::SeqCst));
        assert_eq!(
            silent.received.load(Ordering::SeqCst),
            0,
            "bytes reached a non-server"
        );

        // A server of another model (it greets as one): refused on its greeting, and no
        // request byte is written to it.
        let mut other = bottom_info();
        other.model_id = "some-other-model".into();
        let foreign = Fake::start(Some(other)).await;
        let a = call(&top.model, route(&[&top.addr], &[&foreign.addr]), &limits).await;
        expect_err(
            &a.message,
            ErrorCode::Refused,
            "serves model some-other-model",
        );
        assert!(foreign.connected.load(Ordering::SeqCst));
        assert_eq!(foreign.received.load(Ordering::SeqCst), 0);
        // A real server of another model (another seed): refused too.
        let stranger = Srv::new("1..1", 9, ServeOptions::default());
        let a = call(&top.model, route(&[&top.addr], &[&stranger.addr]), &limits).await;
        expect_err(&a.message, ErrorCode::Refused, "serves model");
        // The right model but not the blocks the route says.
        let a = call(&top.model, route(&[&top.addr], &[&top.addr]), &limits).await;
        expect_err(
            &a.message,
            ErrorCode::Refused,
            "hosts blocks 2..2, not 1..1",
        );

        // A refused replica is skipped when the stage has a real one.
        let a = call(
            &top.model,
            route(&[&top.addr], &[&foreign.addr, &bottom.addr]),
            &limits,
        )
        .await;
        expect_ok(&a);
        assert_eq!(foreign.received.load(Ordering::SeqCst), 0);
    });
}

/// What the bottom server greets with (for a fake to copy).
fn bottom_info() -> blocktrain_protocol::frame::ServerInfo {
    hosted("1..1", 0).info
}

#[test]
fn peers_are_exclusive_and_a_public_server_never_dials_its_own_host() {
    let bottom = Srv::new("1..1", 0, ServeOptions::default());
    let listed = Srv::new(
        "2..2",
        0,
        ServeOptions {
            peers: Some(vec![bottom.addr.clone()]),
            ..ServeOptions::default()
        },
    );
    let elsewhere = Srv::new(
        "2..2",
        0,
        ServeOptions {
            peers: Some(vec!["10.9.9.9:7100".into()]),
            ..ServeOptions::default()
        },
    );
    // Listening on every interface: reached at 127.0.0.1, but not itself on loopback.
    let public = Srv::start("0.0.0.0:0", "2..2", 0, ServeOptions::default());
    let rt = rt();
    rt.block_on(async {
        let limits = HopLimits::default();
        let model = &bottom.model;
        expect_ok(&call(model, route(&[&listed.addr], &[&bottom.addr]), &limits).await);
        let a = call(model, route(&[&elsewhere.addr], &[&bottom.addr]), &limits).await;
        expect_err(&a.message, ErrorCode::Refused, "--peers");
        let a = call(model, route(&[&public.addr], &[&bottom.addr]), &limits).await;
        expect_err(&a.message, ErrorCode::Refused, "is this host");
        // Served before refusing: the refusal is the forwarding's, not the request's.
        assert_eq!(
            accepted(&bottom.addr).await,
            1,
            "only the listed route reached it"
        );
    });
}
