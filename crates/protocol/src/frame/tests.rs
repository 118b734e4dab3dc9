use super::*;

fn sampling() -> Sampling {
    Sampling {
        steps_per_block: 8,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        heun: false,
    }
}

fn route() -> Vec<Stage> {
    vec![
        Stage {
            blocks: "3..4".parse().unwrap(),
            replicas: vec!["10.0.0.3:7100".into()],
        },
        Stage {
            blocks: "1..2".parse().unwrap(),
            replicas: vec!["10.0.0.1:7100".into(), "10.0.0.2:7100".into()],
        },
    ]
}

fn samples() -> Vec<Message> {
    let tokens: Vec<u16> = b"Hello"
        .iter()
        .map(|&b| b as u16)
        .chain(std::iter::repeat_n(MASK_TOKEN, 11))
        .collect();
    let stat = HopStat {
        blocks: "3..4".parse().unwrap(),
        server: "a:1".into(),
        compute_ms: 1.5,
        failovers: 1,
        bytes_out: 40,
    };
    vec![
        Message::Info,
        Message::Keepalive,
        Message::ServerInfo(ServerInfo {
            model_id: "m".into(),
            family: "block".into(),
            blocks: "1..2".parse().unwrap(),
            total: 4,
            max_tokens: 4096,
            d_model: 128,
            window: 128,
            served: 3,
            busy_ms: 1.5,
            batches: 2,
            batched: 5,
        }),
        Message::Denoise(
            DenoiseMeta {
                request_id: 7,
                model_id: "m".into(),
                sampling: sampling(),
                seed: 3,
                route: route(),
                hop: 1,
                hops: vec![stat.clone()],
            },
            tokens.clone(),
        ),
        Message::Result(
            ResultMeta {
                request_id: 7,
                hops: vec![stat.clone()],
            },
            b"Hello, world".to_vec(),
        ),
        Message::Error(HopError {
            request_id: 7,
            code: ErrorCode::Unavailable,
            message: "no replica of blocks 1..2 answered".into(),
            blocks: Some("1..2".parse().unwrap()),
        }),
        Message::ArStep(
            ArStepMeta {
                session: 1,
                output_index: 0,
                hidden: None,
                setup: Some(ArSetup {
                    model_id: "m".into(),
                    sampling: sampling(),
                    seed: 0,
                    route: route(),
                    hop: 0,
                    logprobs: Some(3),
                }),
            },
            ArPayload::Tokens(tokens),
        ),
        Message::ArStep(
            ArStepMeta {
                session: 1,
                output_index: 5,
                hidden: Some((2, 3)),
                setup: None,
            },
            ArPayload::Hidden(vec![0.5, -1.0, 2.0, 0.0, 0.25, 8.0]),
        ),
        Message::ArOutput(ArOutput {
            session: 1,
            byte: b'x',
            hops: vec![stat.clone()],
            logprobs: None,
        }),
        Message::ArOutput(ArOutput {
            session: 1,
            byte: b'x',
            hops: vec![stat.clone()],
            logprobs: Some(logprobs()),
        }),
        Message::Latent(
            DenoiseMeta {
                request_id: 9,
                model_id: "m".into(),
                sampling: sampling(),
                seed: 3,
                route: route(),
                hop: 1,
                hops: vec![stat],
            },
            vec![b'H' as u16, b'i' as u16, MASK_TOKEN],
            LatentState {
                width: 2,
                sigma: 2.5,
                values: vec![0.5, -1.0, 2.0, 0.0, 0.25, 8.0],
            },
        ),
    ]
}

#[test]
fn latent_frames_carry_two_bytes_per_value_and_refuse_bad_shapes() {
    let Message::Latent(m, t, z) = samples().pop().unwrap() else {
        unreachable!()
    };
    let frame = Message::Latent(m.clone(), t.clone(), z.clone()).encode();
    let meta_len = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
    assert_eq!(frame.len() - HEADER_LEN - meta_len, 3 + 1 + 2 * 6);
    // A body whose values do not fill n x width, and non-finite values, are refused.
    let mut short = z.clone();
    short.values.pop();
    let bad = Message::Latent(m.clone(), t.clone(), short).encode();
    assert!(decode_frame(&bad, DEFAULT_MAX_FRAME).is_err());
    let mut inf = z.clone();
    inf.values[0] = f32::INFINITY;
    let bad = Message::Latent(m.clone(), t.clone(), inf).encode();
    assert!(decode_frame(&bad, DEFAULT_MAX_FRAME).is_err());
    let mut neg = z;
    neg.sigma = -1.0;
    assert!(decode_frame(&Message::Latent(m, t, neg).encode(), DEFAULT_MAX_FRAME).is_err());
}

fn logprobs() -> ByteLogprobs {
    ByteLogprobs {
        logprob: -1.25,
        top: vec![(b'y', -0.5), (b'x', -1.25), (0xC3, -1.25)],
    }
}

#[test]
fn ar_logprobs_are_optional_on_the_wire_and_checked_when_present() {
    // A frame from a sender before log-probabilities (no field) reads as none, and a
    // setup or output without them writes no field, so older peers read it as before.
    let old = br#"{"session":1,"byte":120,"hops":[]}"#;
    let o: ArOutput = serde_json::from_slice(old).unwrap();
    assert_eq!(o.logprobs, None);
    let m = Message::ArOutput(o).encode();
    assert!(!String::from_utf8_lossy(&m).contains("logprobs"));
    let setup = br#"{"model_id":"m","sampling":{"steps_per_block":1,"temperature":1.0,"top_k":0},"seed":0,"route":[],"hop":0}"#;
    assert_eq!(
        serde_json::from_slice::<ArSetup>(setup).unwrap().logprobs,
        None
    );
    let output = |lp: ByteLogprobs| {
        let m = Message::ArOutput(ArOutput {
            session: 1,
            byte: b'x',
            hops: Vec::new(),
            logprobs: Some(lp),
        });
        decode_frame(&m.encode(), DEFAULT_MAX_FRAME).map_err(|e| e.to_string())
    };
    assert!(output(logprobs()).is_ok());
    let mut too_many = logprobs();
    too_many.top = (0..=MAX_TOP_LOGPROBS as u8).map(|b| (b, -6.0)).collect();
    assert!(output(too_many).unwrap_err().contains("at most 5"));
    let mut positive = logprobs();
    positive.logprob = 0.5;
    assert!(output(positive).unwrap_err().contains("<= 0"));
    let mut unsorted = logprobs();
    unsorted.top.swap(0, 1);
    assert!(output(unsorted).unwrap_err().contains("most likely first"));
    let mut twice = logprobs();
    twice.top[2].0 = b'y';
    assert!(output(twice).unwrap_err().contains("twice"));
    // Non-finite values cannot even be written as JSON numbers: they arrive as null.
    let mut inf = logprobs();
    inf.top[1].1 = f32::NEG_INFINITY;
    assert!(output(inf).is_err());
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        let bytes = m.encode();
        assert_eq!(decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap(), m);
    }
}

#[test]
fn tokens_pack_to_a_byte_each_plus_a_bitmap() {
    for n in 0..40usize {
        let t: Vec<u16> = (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    MASK_TOKEN
                } else {
                    i as u16 * 7 % 256
                }
            })
            .collect();
        let body = encode_tokens(&t);
        assert_eq!(body.len(), n + n.div_ceil(8));
        assert_eq!(decode_tokens(&body).unwrap(), t);
    }
    // A masked position carrying a byte, and a stray bitmap bit, are refused.
    let mut body = encode_tokens(&[MASK_TOKEN, 5]);
    body[0] = 9;
    assert!(decode_tokens(&body).is_err());
    let mut body = encode_tokens(&[1, 2]);
    body[2] |= 0x80;
    assert!(decode_tokens(&body).is_err());
}

#[test]
fn bad_headers_are_refused_before_allocation() {
    let good = Message::Info.encode();
    let head = |b: &[u8]| -> [u8; HEADER_LEN] { b[..HEADER_LEN].try_into().unwrap() };
    assert!(parse_header(&head(&good), DEFAULT_MAX_FRAME).is_ok());
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(parse_header(&head(&bad), DEFAULT_MAX_FRAME).is_err());
    let mut bad = good.clone();
    bad[4] = 9; // version
    let e = parse_header(&head(&bad), DEFAULT_MAX_FRAME).unwrap_err();
    assert!(e.to_string().contains("version 9"), "{e}");
    let mut bad = good.clone();
    bad[6] = 99; // kind
    assert!(parse_header(&head(&bad), DEFAULT_MAX_FRAME).is_err());
    let mut bad = good.clone();
    bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes()); // 4 GiB body
    let e = parse_header(&head(&bad), DEFAULT_MAX_FRAME).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
}

#[test]
fn truncated_or_mangled_frames_error_and_never_panic() {
    for m in samples() {
        let bytes = m.encode();
        for cut in 0..bytes.len() {
            assert!(decode_frame(&bytes[..cut], DEFAULT_MAX_FRAME).is_err());
        }
        // Flip every byte in turn: decoding may succeed (a byte value changed) but
        // must not panic.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let _ = decode_frame(&b, DEFAULT_MAX_FRAME);
        }
    }
}

#[test]
fn routes_must_name_the_receiver_and_a_server_per_stage() {
    let mut m = match &samples()[3] {
        Message::Denoise(m, _) => m.clone(),
        _ => unreachable!(),
    };
    m.hop = 2;
    let bytes = Message::Denoise(m.clone(), vec![1]).encode();
    assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
    m.hop = 0;
    let mut empty = m.clone();
    empty.route[1].replicas.clear();
    let bytes = Message::Denoise(empty, vec![1]).encode();
    assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
    // A route that would make a server dial hundreds of addresses is refused.
    let mut many = m.clone();
    many.route[1].replicas = (0..=MAX_REPLICAS)
        .map(|i| format!("10.0.0.{i}:1"))
        .collect();
    let bytes = Message::Denoise(many, vec![1]).encode();
    assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
    let mut long = m;
    long.route = vec![long.route[0].clone(); MAX_STAGES + 1];
    let bytes = Message::Denoise(long, vec![1]).encode();
    assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
}

#[test]
fn block_ranges_parse_one_based_inclusive() {
    let r: BlockRange = "3..4".parse().unwrap();
    assert_eq!((r.first, r.last, r.len()), (3, 4, 2));
    assert!(r.contains(3) && r.contains(4) && !r.contains(2));
    assert_eq!("2".parse::<BlockRange>().unwrap().len(), 1);
    assert_eq!(r.to_string().parse::<BlockRange>().unwrap(), r);
    for bad in ["0..2", "4..3", "a..b", "", "1..", "-1", "1..4294967295"] {
        assert!(bad.parse::<BlockRange>().is_err(), "{bad}");
    }
    // The same checks hold for ranges arriving in frame metadata.
    for bad in [
        r#"{"first":3,"last":1}"#,
        r#"{"first":0,"last":1}"#,
        r#"{"first":1,"last":4294967295}"#,
    ] {
        assert!(serde_json::from_str::<BlockRange>(bad).is_err(), "{bad}");
    }
    assert_eq!(
        serde_json::from_str::<BlockRange>(r#"{"first":3,"last":4}"#).unwrap(),
        r
    );
}
