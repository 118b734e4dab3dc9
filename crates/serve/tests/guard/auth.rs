//! Authentication per connection: a Hello signing the greeting's challenge, checked
//! against an allowlist or a join secret; servers authenticate downstream with their
//! own key.
use std::collections::HashSet;
use std::sync::Arc;

use blocktrain_protocol::frame::{ErrorCode, Hello, Message};
use blocktrain_protocol::identity::Identity;
use blocktrain_serve::hop::{Credentials, HopLimits};
use blocktrain_serve::server::{ClientAuth, ServeOptions};

use super::support::*;

fn as_key(id: &Identity, secret: Option<&str>) -> HopLimits {
    HopLimits {
        credentials: Some(Arc::new(Credentials {
            identity: id.clone(),
            join_secret: secret.map(str::to_string),
        })),
        ..HopLimits::default()
    }
}

fn allowing(keys: &[&Identity]) -> ServeOptions {
    ServeOptions {
        auth: ClientAuth {
            allow: Some(keys.iter().map(|k| k.public_hex()).collect::<HashSet<_>>()),
            join_secret: None,
        },
        ..ServeOptions::default()
    }
}

#[test]
fn allowlisted_keys_are_served_others_refused_and_a_hello_is_not_replayable() {
    let (client, stranger) = (Identity::generate(), Identity::generate());
    let top_id = Identity::generate();
    // The bottom admits the client and the top server (which forwards with its own key).
    let bottom = Srv::new("1..1", 0, allowing(&[&client, &top_id]));
    let top = Srv::new(
        "2..2",
        0,
        ServeOptions {
            identity: top_id.clone(),
            ..allowing(&[&client])
        },
    );
    // A top stage whose key the bottom does not admit.
    let rogue = Srv::new("2..2", 0, allowing(&[&client]));
    let rt = rt();
    rt.block_on(async {
        let model = top.model.clone();
        let path = || route(&[&top.addr], &[&bottom.addr]);
        // Allowlisted: served, and the forwarded hop is authenticated by the top's key.
        expect_ok(&call(&model, path(), &as_key(&client, None)).await);
        let a = call(
            &model,
            route(&[&rogue.addr], &[&bottom.addr]),
            &as_key(&client, None),
        )
        .await;
        expect_err(&a.message, ErrorCode::Unauthorized, "allowlist");
        // Another key: refused by name of the rule.
        let a = call(&model, path(), &as_key(&stranger, None)).await;
        expect_err(&a.message, ErrorCode::Unauthorized, "allowlist");
        // No key: the caller sees the server requires one before sending anything...
        let a = call(&model, path(), &HopLimits::default()).await;
        expect_err(&a.message, ErrorCode::Unauthorized, "no key");
        // ...and an unsigned request sent anyway is refused, not computed.
        let (mut s, g) = raw(&top.addr).await;
        assert!(g.auth);
        let (meta, tokens) = request(&model, path(), 4, 2);
        send(&mut s, &Message::Denoise(meta.clone(), tokens.clone())).await;
        expect_err(
            &reply(&mut s).await,
            ErrorCode::Unauthorized,
            "authenticated clients only",
        );

        // A Hello captured from one connection does not open another.
        let (_first, g1) = raw(&top.addr).await;
        let captured = Hello::sign(&client, &g1, None);
        let (mut second, g2) = raw(&top.addr).await;
        assert_ne!(g1.challenge, g2.challenge);
        send(&mut second, &Message::Hello(captured)).await;
        expect_err(
            &reply(&mut second).await,
            ErrorCode::Unauthorized,
            "bad Hello",
        );
        // The right Hello on it works, request after request.
        let (mut third, g3) = raw(&top.addr).await;
        send(&mut third, &Message::Hello(Hello::sign(&client, &g3, None))).await;
        for _ in 0..2 {
            send(&mut third, &Message::Denoise(meta.clone(), tokens.clone())).await;
            assert!(matches!(reply(&mut third).await, Message::Result(..)));
        }
    });
}

#[test]
fn a_join_secret_admits_any_key_that_proves_it() {
    let secret = "correct horse battery";
    let opts = || ServeOptions {
        auth: ClientAuth {
            allow: None,
            join_secret: Some(secret.into()),
        },
        ..ServeOptions::default()
    };
    let bottom = Srv::new("1..1", 0, opts());
    let top = Srv::new("2..2", 0, opts());
    let rt = rt();
    rt.block_on(async {
        let path = || route(&[&top.addr], &[&bottom.addr]);
        let id = Identity::generate();
        // Fresh keys on both the client and the servers: the secret is what admits them.
        expect_ok(&call(&top.model, path(), &as_key(&id, Some(secret))).await);
        let a = call(&top.model, path(), &as_key(&id, Some("wrong secret!"))).await;
        expect_err(&a.message, ErrorCode::Unauthorized, "join secret");
        let a = call(&top.model, path(), &as_key(&id, None)).await;
        expect_err(&a.message, ErrorCode::Unauthorized, "join secret");
    });
}
