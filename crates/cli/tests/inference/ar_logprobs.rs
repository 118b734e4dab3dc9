//! AR log-probabilities across servers: what the last stage reports for every byte is
//! the model's log-softmax for that byte's context, as the same checkpoint computes it
//! in this process; alternatives come most likely first, greedy picks the first, and a
//! peer asking for more than 5 is refused by name.
use blocktrain_model::run::RunDir;
use blocktrain_model::transformer::{Denoiser, KvCache};
use blocktrain_model::MASK_ID;
use blocktrain_protocol::frame::{BlockRange, ByteLogprobs};
use blocktrain_serve::client::{Generation, Plan};
use tch::{Device, Kind, Tensor};

use super::harness::*;

/// The model's log-softmax over the next byte after `ids`, computed here from scratch
/// (one prefill over a fresh cache).
fn local_logprobs(net: &Denoiser, ids: &[i64]) -> Vec<f32> {
    tch::no_grad(|| {
        let x = Tensor::from_slice(ids).view([1, -1]);
        let mut cache = KvCache::new();
        let h = net.forward_layers_cached(0..net.n_layers(), &net.embed(&x), &mut cache);
        let lps = net
            .head_logits(&h.narrow(1, -1, 1))
            .view([-1])
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float);
        Vec::try_from(lps).unwrap()
    })
}

/// The context each output byte was sampled after, as the AR client keeps it: MASK +
/// prompt, restarted from the last `window / 2` ids when it would outgrow the window.
fn contexts(prompt: &[u8], output: &[u8], window: usize) -> Vec<Vec<i64>> {
    let mut ids: Vec<i64> = std::iter::once(MASK_ID)
        .chain(prompt.iter().map(|&b| b as i64))
        .collect();
    let mut start = ids.len().saturating_sub(window);
    let mut out = Vec::new();
    for &b in output {
        if ids.len() - start > window {
            start = ids.len() - window / 2;
        }
        out.push(ids[start..].to_vec());
        ids.push(b as i64);
    }
    out
}

fn scored(plan: &Plan, req: &Request, n: u32) -> Generation {
    let mut seen = 0;
    let mut on_byte = |_, lp: Option<&ByteLogprobs>| {
        assert!(lp.is_some(), "every byte comes with its log-probabilities");
        seen += 1;
        true
    };
    let g = rt()
        .block_on(client::generate_ar_scored(
            plan,
            req,
            Some(n),
            &HopLimits::default(),
            &mut on_byte,
        ))
        .unwrap();
    assert_eq!(seen, req.len);
    g
}

/// Checks every byte's reported log-probabilities against the model's, to `tol`.
fn check_against_model(net: &Denoiser, req: &Request, g: &Generation, n: u32, tol: f32) {
    let window = net.config().window as usize;
    assert_eq!(g.logprobs.len(), g.output.len());
    let ctx = contexts(&req.prompt, &g.output, window);
    let (mut listed, mut worst) = (0, 0.0f32);
    for (i, ((lp, &byte), ids)) in g.logprobs.iter().zip(&g.output).zip(&ctx).enumerate() {
        let local = local_logprobs(net, ids);
        let mut near = |a: f32, b: f32| {
            worst = worst.max((a - b).abs());
            (a - b).abs() <= tol
        };
        assert!(
            near(lp.logprob, local[byte as usize]),
            "byte {i} ({byte}): served {} vs the model's {}",
            lp.logprob,
            local[byte as usize]
        );
        assert_eq!(lp.top.len(), n as usize);
        let mut sorted = local.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for (k, &(b, v)) in lp.top.iter().enumerate() {
            assert!(near(v, local[b as usize]), "byte {i}, alternative {b}");
            assert!(
                near(v, sorted[k]),
                "byte {i}: alternative {k} is not the {k}-th most likely"
            );
        }
        assert!(
            lp.top.windows(2).all(|w| w[0].1 >= w[1].1),
            "most likely first"
        );
        // The sampled byte is listed when it is at least as likely as the last listed.
        if lp.top.last().is_some_and(|&(_, v)| lp.logprob > v) {
            assert!(
                lp.top.iter().any(|&(b, _)| b == byte),
                "byte {i} not listed"
            );
            listed += 1;
        }
    }
    eprintln!(
        "{listed} of {} sampled bytes were more likely than the last alternative; largest difference from the model's {worst:e}",
        g.output.len()
    );
}

#[test]
fn served_logprobs_are_the_models_log_softmax_for_the_same_context() {
    let dir = scratch("ar-logprobs");
    let ckpt = train(&dir, "ar");
    let net = RunDir::open(&ckpt)
        .unwrap()
        .trained(0, Device::Cpu)
        .unwrap()
        .net;
    // All layers on one server: the same f32 compute as here (to 1e-4).
    let whole = serve(&dir, &ckpt, "1..3");
    // Two stages: hidden states cross as f16, so the values agree to f16's rounding.
    let low = serve(&dir, &ckpt, "1..2");
    let high = serve(&dir, &ckpt, "3");
    let limits = HopLimits::default();
    let plan = |addrs: &[&str]| {
        let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        rt().block_on(client::discover(&addrs, &limits)).unwrap()
    };
    let one = plan(&[&whole.addr]);
    let two = plan(&[&low.addr, &high.addr]);
    assert_eq!((one.stages.len(), two.stages.len()), (1, 2));

    // Sampled at temperature 1, long enough for the context to restart once (window 32).
    let req = Request {
        len: 40,
        ..request()
    };
    assert!(req.prompt.len() + 1 + req.len > net.config().window as usize);
    let g = scored(&one, &req, 5);
    check_against_model(&net, &req, &g, 5, 1e-4);
    // Log-probabilities change nothing else: the same bytes as without them.
    let plain = rt()
        .block_on(client::generate(&one, &req, &limits))
        .unwrap();
    assert_eq!(plain.output, g.output);
    assert!(plain.logprobs.is_empty());
    // The model's distribution, not the sampler's: a hotter temperature samples other
    // bytes, but each byte's value is still the model's log-softmax.
    let mut hot = req.clone();
    hot.sampling.temperature = 2.0;
    hot.sampling.top_k = 40;
    check_against_model(&net, &hot, &scored(&one, &hot, 2), 2, 1e-4);

    let g2 = scored(&two, &req, 3);
    check_against_model(&net, &req, &g2, 3, 1e-3);

    // Greedy: every byte is the first alternative, and is listed even with one.
    let mut greedy = req.clone();
    greedy.sampling.top_k = 1;
    let g = scored(&one, &greedy, 1);
    check_against_model(&net, &greedy, &g, 1, 1e-4);
    for (lp, &b) in g.logprobs.iter().zip(&g.output) {
        assert_eq!(
            lp.top[0],
            (b, lp.logprob),
            "greedy picks the most likely byte"
        );
    }
    // n = 0: the sampled byte's value alone.
    let g = scored(&one, &greedy, 0);
    assert!(g.logprobs.iter().all(|lp| lp.top.is_empty()));

    // A client asking for more than 5 is refused before anything is sent.
    let e = rt()
        .block_on(client::generate_ar_scored(
            &one,
            &req,
            Some(6),
            &limits,
            &mut |_, _| true,
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 5"), "{e}");
}

/// A hand-made setup asking for 6 alternatives (a hostile or broken client) is refused
/// by the server with a reason, not clamped silently or indexed by.
#[test]
fn a_setup_asking_for_more_than_five_alternatives_is_refused_by_name() {
    let dir = scratch("ar-logprobs-bound");
    let ckpt = train(&dir, "ar");
    let s = serve(&dir, &ckpt, "1..3");
    let info = rt()
        .block_on(client::server_info(&s.addr, &HopLimits::default()))
        .unwrap();
    let step = |logprobs: Option<u32>| {
        Message::ArStep(
            ArStepMeta {
                session: 1,
                output_index: 0,
                hidden: None,
                setup: Some(ArSetup {
                    model_id: info.model_id.clone(),
                    sampling: request().sampling,
                    seed: 0,
                    route: vec![Stage {
                        blocks: BlockRange { first: 1, last: 3 },
                        replicas: vec![s.addr.clone()],
                    }],
                    hop: 0,
                    logprobs,
                }),
            },
            ArPayload::Tokens(vec![MASK_TOKEN, b'a' as u16]),
        )
        .encode()
    };
    for n in [6, u32::MAX] {
        expect_error(
            raw(&s.addr, &step(Some(n))),
            ErrorCode::BadRequest,
            "at most 5",
        );
    }
    match raw(&s.addr, &step(Some(5))) {
        Message::ArOutput(o) => {
            let lp = o.logprobs.expect("asked for");
            assert_eq!(lp.top.len(), 5);
            assert!(lp.check_shape().is_ok());
        }
        other => panic!("{other:?}"),
    }
    match raw(&s.addr, &step(None)) {
        Message::ArOutput(o) => assert_eq!(o.logprobs, None),
        other => panic!("{other:?}"),
    }
}
