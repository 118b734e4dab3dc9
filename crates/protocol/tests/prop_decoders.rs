//! Property tests of every decoder that reads a peer's bytes: inference frames, update
//! payloads, signed requests, receipts and their Merkle proofs. Arbitrary and mutated
//! input must give a value or an error, never a panic, and decoding must allocate in
//! proportion to the bytes it was handed (the size limit is checked before anything is
//! built from a declared size).
//!
//! A counting global allocator measures, per thread, the peak of live heap bytes while a
//! decoder runs, so "never allocates beyond the limit" is checked, not assumed.
use std::collections::BTreeMap;
use std::sync::OnceLock;

use blocktrain_protocol::codec::{self, Array, Arrays, Codec, Shapes};
use blocktrain_protocol::frame::{
    self, decode_frame, decode_tokens, encode_tokens, parse_header, ArOutput, ArPayload, ArSetup,
    ArStepMeta, BlockRange, ByteLogprobs, DenoiseMeta, ErrorCode, Header, HopError, HopStat,
    LatentState, Message, ResultMeta, Sampling, ServerInfo, Stage, DEFAULT_MAX_FRAME, HEADER_LEN,
    MASK_TOKEN, MAX_BLOCK, MAX_META, MAX_TOP_LOGPROBS,
};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{
    verify_consistency, verify_inclusion, Claim, ConsistencyProof, Decision, InclusionProof,
    LogHash, Receipt, ReceiptProof, TreeHead, RECEIPT_VERSION,
};
use blocktrain_protocol::signed::{sign, verify_request, Auth};
use blocktrain_protocol::ProtocolError;
use ct_merkle::mem_backed_tree::MemoryBackedTree;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------------------
// Allocation meter
// ---------------------------------------------------------------------------------------

mod meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting this thread's live bytes and their peak.
    pub struct Meter;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // Requests are counted before they are made, so an attempt to reserve a declared
    // size shows in the peak even when the system refuses it.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            let p = unsafe { System.alloc(layout) };
            if p.is_null() {
                add(-(layout.size() as isize));
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            let p = unsafe { System.alloc_zeroed(layout) };
            if p.is_null() {
                add(-(layout.size() as isize));
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            add(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // Old and new blocks may both be live while the data moves.
            add(new_size as isize);
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if p.is_null() {
                add(-(new_size as isize));
            } else {
                add(-(layout.size() as isize));
            }
            p
        }
    }

    /// Runs `f` and returns its result with the most heap bytes it had live at once
    /// (on this thread, above what was live before; its result included).
    pub fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        let peak = PEAK.with(Cell::get);
        (out, (peak - base).max(0) as usize)
    }
}

#[global_allocator]
static METER: meter::Meter = meter::Meter;

/// What a decoder may allocate for `input` bytes: a constant factor of them (parsed
/// JSON and safetensors headers take a few times their text) plus `output` bytes of
/// result whose size the receiver fixed, plus slack for error messages.
fn budget(input: usize, output: usize) -> usize {
    32 * input + output + 64 * 1024
}

// ---------------------------------------------------------------------------------------
// Inference frames
// ---------------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |v| v.is_finite())
}

fn block_range() -> impl Strategy<Value = BlockRange> {
    prop_oneof![
        (1u32..8, 0u32..4).prop_map(|(f, n)| (f, f + n)),
        (1..=MAX_BLOCK).prop_flat_map(|f| (Just(f), f..=MAX_BLOCK)),
    ]
    .prop_map(|(f, l)| BlockRange::new(f, l).unwrap())
}

fn sampling() -> impl Strategy<Value = Sampling> {
    (any::<u32>(), finite(), any::<u32>(), any::<bool>()).prop_map(
        |(steps_per_block, temperature, top_k, heun)| Sampling {
            steps_per_block,
            temperature,
            top_k,
            top_p: 1.0,
            heun,
        },
    )
}

fn hop_stat() -> impl Strategy<Value = HopStat> {
    (block_range(), text(), finite(), any::<u32>(), any::<u64>()).prop_map(
        |(blocks, server, compute_ms, failovers, bytes_out)| HopStat {
            blocks,
            server,
            compute_ms,
            failovers,
            bytes_out,
        },
    )
}

/// A route `check_route` accepts, and the index of a stage in it.
fn route() -> impl Strategy<Value = (Vec<Stage>, u32)> {
    vec(
        (block_range(), vec(text(), 1..=3))
            .prop_map(|(blocks, replicas)| Stage { blocks, replicas }),
        1..=4,
    )
    .prop_flat_map(|r| {
        let n = r.len() as u32;
        (Just(r), 0..n)
    })
}

/// Tokens as the model writes them: bytes or the mask id.
fn tokens() -> impl Strategy<Value = Vec<u16>> {
    vec(prop_oneof![0u16..256, Just(MASK_TOKEN)], 0..48)
}

/// An f32 that survives the f16 trip of hidden states exactly.
fn f16_value() -> impl Strategy<Value = f32> {
    any::<u16>()
        .prop_map(half::f16::from_bits)
        .prop_filter("finite", |h| h.is_finite())
        .prop_map(half::f16::to_f32)
}

fn ar_setup() -> impl Strategy<Value = ArSetup> {
    (
        text(),
        sampling(),
        any::<u64>(),
        route(),
        proptest::option::of(0..=MAX_TOP_LOGPROBS),
    )
        .prop_map(
            |(model_id, sampling, seed, (route, hop), logprobs)| ArSetup {
                model_id,
                sampling,
                seed,
                route,
                hop,
                logprobs,
            },
        )
}

/// Log-probabilities a well-behaved last stage sends: up to 5 distinct bytes, most
/// likely first, every value finite and at most 0.
fn byte_logprobs() -> impl Strategy<Value = ByteLogprobs> {
    (
        -80.0f32..=0.0,
        proptest::sample::subsequence((0..=255u8).collect::<Vec<_>>(), 0..=5),
        vec(-80.0f32..=0.0, 5),
    )
        .prop_map(|(logprob, bytes, mut lps)| {
            lps.sort_by(|a, b| b.total_cmp(a));
            ByteLogprobs {
                logprob,
                top: bytes.into_iter().zip(lps).collect(),
            }
        })
}

fn ar_step() -> impl Strategy<Value = Message> {
    let payload = prop_oneof![
        tokens().prop_map(|t| (None, ArPayload::Tokens(t))),
        (0u32..4, 0u32..5).prop_flat_map(|(rows, d)| {
            vec(f16_value(), (rows * d) as usize)
                .prop_map(move |h| (Some((rows, d)), ArPayload::Hidden(h)))
        }),
    ];
    (
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(ar_setup()),
        payload,
    )
        .prop_map(|(session, output_index, setup, (hidden, payload))| {
            Message::ArStep(
                ArStepMeta {
                    session,
                    output_index,
                    hidden,
                    setup,
                },
                payload,
            )
        })
}

/// Any message a well-behaved peer could send.
fn message() -> impl Strategy<Value = Message> {
    let code = prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Mismatch),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
    ];
    prop_oneof![
        Just(Message::Info),
        Just(Message::Keepalive),
        (
            text(),
            text(),
            block_range(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(model_id, family, blocks, total, max_tokens, d_model, window, served)| {
                    Message::ServerInfo(ServerInfo {
                        model_id,
                        family,
                        blocks,
                        total,
                        max_tokens,
                        d_model,
                        window,
                        served,
                        busy_ms: 0.5,
                        batches: 0,
                        batched: 0,
                    })
                }
            ),
        (
            any::<u64>(),
            sampling(),
            route(),
            tokens(),
            1u32..5,
            0.01f64..100.0
        )
            .prop_flat_map(|(request_id, sampling, (route, hop), t, width, sigma)| {
                let n = t.len() * width as usize;
                (
                    Just((request_id, sampling, route, hop, t, width, sigma)),
                    vec(-60000.0f32..60000.0, n..=n),
                )
            })
            .prop_map(
                |((request_id, sampling, route, hop, t, width, sigma), values)| {
                    // f16 keeps about 3 digits: send values it holds exactly.
                    let values = values
                        .into_iter()
                        .map(|v| half::f16::from_f32(v).to_f32())
                        .collect();
                    Message::Latent(
                        DenoiseMeta {
                            request_id,
                            model_id: "m".into(),
                            sampling,
                            seed: 1,
                            route,
                            hop,
                            hops: Vec::new(),
                        },
                        t,
                        LatentState {
                            width,
                            sigma,
                            values,
                        },
                    )
                }
            ),
        (
            any::<u64>(),
            text(),
            sampling(),
            any::<u64>(),
            route(),
            vec(hop_stat(), 0..3),
            tokens()
        )
            .prop_map(
                |(request_id, model_id, sampling, seed, (route, hop), hops, t)| {
                    Message::Denoise(
                        DenoiseMeta {
                            request_id,
                            model_id,
                            sampling,
                            seed,
                            route,
                            hop,
                            hops,
                        },
                        t,
                    )
                }
            ),
        (any::<u64>(), vec(hop_stat(), 0..3), vec(any::<u8>(), 0..64)).prop_map(
            |(request_id, hops, body)| Message::Result(ResultMeta { request_id, hops }, body)
        ),
        (
            any::<u64>(),
            code,
            text(),
            proptest::option::of(block_range())
        )
            .prop_map(|(request_id, code, message, blocks)| {
                Message::Error(HopError {
                    request_id,
                    code,
                    message,
                    blocks,
                })
            }),
        ar_step(),
        (
            any::<u64>(),
            any::<u8>(),
            vec(hop_stat(), 0..3),
            proptest::option::of(byte_logprobs())
        )
            .prop_map(|(session, byte, hops, logprobs)| {
                Message::ArOutput(ArOutput {
                    session,
                    byte,
                    hops,
                    logprobs,
                })
            }),
    ]
}

type Decoded = Result<Message, ProtocolError>;

/// Decodes a whole frame under the allocation meter and checks the budget.
fn decode_metered(bytes: &[u8]) -> Result<Decoded, TestCaseError> {
    let (out, peak) = meter::peak(|| decode_frame(bytes, DEFAULT_MAX_FRAME));
    prop_assert!(
        peak <= budget(bytes.len(), 0),
        "decoding a {}-byte frame allocated {peak} bytes",
        bytes.len()
    );
    Ok(out)
}

/// Replaces the body of an encoded frame, keeping its header kind and metadata.
fn reframe(frame: &[u8], body: &[u8]) -> Vec<u8> {
    let meta_len = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
    let mut out = frame[..HEADER_LEN + meta_len].to_vec();
    out[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

proptest! {
    #[test]
    fn frames_round_trip(m in message()) {
        let bytes = m.encode();
        let head: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let h = parse_header(head, DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(h.payload_len(), bytes.len() - HEADER_LEN);
        prop_assert_eq!(Message::decode(&h, &bytes[HEADER_LEN..]).unwrap(), m.clone());
        prop_assert_eq!(decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap(), m);
    }

    #[test]
    fn mutated_frames_never_panic(
        m in message(),
        edits in vec((any::<Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = m.encode();
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        let _ = decode_metered(&bytes)?;
    }

    #[test]
    fn truncated_or_extended_frames_are_refused(
        m in message(),
        cut in any::<Index>(),
        extra in vec(any::<u8>(), 1..8),
    ) {
        let bytes = m.encode();
        let cut = cut.index(bytes.len());
        prop_assert!(decode_frame(&bytes[..cut], DEFAULT_MAX_FRAME).is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(decode_frame(&longer, DEFAULT_MAX_FRAME).is_err());
    }

    /// A well-formed header and metadata with any body: the body decoders (tokens,
    /// hidden states, raw bytes) are total, and what they accept is canonical: it
    /// encodes back to the very same frame.
    #[test]
    fn any_body_after_valid_metadata_decodes_canonically(
        m in message(),
        body in prop_oneof![
            vec(any::<u8>(), 0..80),
            // Hidden-state sized bodies of f16 values, finite or not.
            (0usize..24).prop_flat_map(|n| vec(any::<u8>(), 2 * n)),
        ],
    ) {
        let frame = reframe(&m.encode(), &body);
        if let Ok(back) = decode_metered(&frame)? {
            prop_assert_eq!(back.encode(), frame);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        let _ = decode_metered(&bytes)?;
        let _ = decode_tokens(&bytes);
    }

    /// Arbitrary bytes behind a header that passes: reaches `Message::decode` for every
    /// kind.
    #[test]
    fn arbitrary_payloads_behind_a_valid_header_never_panic(
        kind in 1u8..=9,
        meta in prop_oneof![
            vec(any::<u8>(), 0..64),
            Just(b"{}".to_vec()),
            Just(br#"{"hidden":[2,3],"session":1,"output_index":0,"setup":null}"#.to_vec()),
            Just(br#"{"request_id":1,"hops":[]}"#.to_vec()),
            // A valid latent request: random bodies reach the latent's length checks.
            Just(br#"{"request_id":1,"model_id":"m","sampling":{"steps_per_block":2,"temperature":1.0,"top_k":0},"seed":0,"route":[{"blocks":{"first":1,"last":1},"replicas":["a:1"]}],"hop":0,"hops":[],"width":3,"sigma":2.5}"#.to_vec()),
        ],
        body in vec(any::<u8>(), 0..160),
    ) {
        let mut bytes = b"BTIF\x01\x00".to_vec();
        bytes.push(kind);
        bytes.push(0);
        bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(&body);
        let _ = decode_metered(&bytes)?;
    }

    /// `Header`'s fields are public, so `Message::decode` must also survive a header
    /// that `parse_header` never produced.
    #[test]
    fn decode_survives_any_header_struct(
        m in message(),
        meta_len in any::<u32>(),
        body_len in any::<u32>(),
        use_actual in any::<bool>(),
    ) {
        let bytes = m.encode();
        let payload = &bytes[HEADER_LEN..];
        let head: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let kind = parse_header(head, DEFAULT_MAX_FRAME).unwrap().kind;
        let (meta_len, body_len) = if use_actual {
            let split = meta_len as usize % (payload.len() + 1);
            (split as u32, (payload.len() - split) as u32)
        } else {
            (meta_len, body_len)
        };
        let h = Header { kind, meta_len, body_len };
        let _ = Message::decode(&h, payload);
    }

    #[test]
    fn headers_are_checked_against_the_limits(
        head in prop_oneof![
            any::<[u8; HEADER_LEN]>(),
            (1u8..=9, any::<u32>(), any::<u32>()).prop_map(|(k, m, b)| {
                let mut h = [0u8; HEADER_LEN];
                h[..6].copy_from_slice(b"BTIF\x01\x00");
                h[6] = k;
                h[8..12].copy_from_slice(&(m % (2 * MAX_META)).to_le_bytes());
                h[12..16].copy_from_slice(&b.to_le_bytes());
                h
            }),
        ],
        max_frame in prop_oneof![Just(DEFAULT_MAX_FRAME), any::<u32>()],
    ) {
        let (out, peak) = meter::peak(|| parse_header(&head, max_frame));
        prop_assert!(peak < 4096, "parse_header allocated {peak} bytes");
        if let Ok(h) = out {
            prop_assert_eq!(&head[..4], &frame::MAGIC[..]);
            prop_assert_eq!(head[7], 0);
            prop_assert!(h.meta_len <= MAX_META);
            prop_assert!(h.meta_len as u64 + h.body_len as u64 <= max_frame as u64);
        }
    }

    #[test]
    fn tokens_round_trip_and_decoding_is_canonical(
        t in tokens(),
        body in vec(any::<u8>(), 0..64),
    ) {
        let enc = encode_tokens(&t);
        prop_assert_eq!(decode_tokens(&enc).unwrap(), t);
        if let Ok(back) = decode_tokens(&body) {
            prop_assert!(back.iter().all(|&v| v <= MASK_TOKEN));
            prop_assert_eq!(encode_tokens(&back), body);
        }
    }

    /// An AR output's log-probabilities are a hostile last stage's: whatever it sends,
    /// what decodes holds at most 5 distinct alternatives, most likely first, and
    /// finite values at most 0 (what the gateway renders and never indexes by).
    #[test]
    fn ar_output_logprobs_from_the_sender_decode_only_in_shape(
        logprob in prop_oneof![-100.0f32..1.0, Just(0.0), Just(f32::MIN), Just(1e-30)],
        top in vec((any::<u8>(), prop_oneof![-100.0f32..1.0, Just(-0.0)]), 0..9),
        raw in prop_oneof![
            Just(String::new()),
            Just(r#","logprobs":{"logprob":-1,"top":[[300,-1]]}"#.to_string()),
            Just(r#","logprobs":{"logprob":null,"top":[]}"#.to_string()),
            Just(r#","logprobs":{"logprob":-1,"top":[[1]]}"#.to_string()),
            Just(r#","logprobs":{"logprob":-1e39,"top":[]}"#.to_string()),
            Just(r#","logprobs":{"logprob":-1,"top":null}"#.to_string()),
        ],
    ) {
        let lp = ByteLogprobs { logprob, top };
        let m = Message::ArOutput(ArOutput { session: 1, byte: 7, hops: Vec::new(), logprobs: Some(lp.clone()) });
        let sorted = lp.top.windows(2).all(|w| w[0].1 >= w[1].1);
        let distinct = lp.top.iter().enumerate().all(|(i, (b, _))| lp.top[..i].iter().all(|(a, _)| a != b));
        let in_range = |v: f32| v <= 0.0;
        let valid = in_range(lp.logprob) && lp.top.len() <= MAX_TOP_LOGPROBS as usize
            && lp.top.iter().all(|(_, v)| in_range(*v)) && sorted && distinct;
        match decode_metered(&m.encode())? {
            Ok(back) => {
                prop_assert!(valid, "accepted {lp:?}");
                prop_assert_eq!(back, m);
            }
            Err(e) => prop_assert!(!valid, "refused {lp:?}: {e}"),
        }
        // Metadata written by hand: wrong types and out-of-range bytes are refused too.
        if !raw.is_empty() {
            let meta = format!(r#"{{"session":1,"byte":7,"hops":[]{raw}}}"#);
            let mut bytes = b"BTIF\x01\x00\x08\x00".to_vec();
            bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(meta.as_bytes());
            prop_assert!(decode_metered(&bytes)?.is_err(), "{meta}");
        }
    }

    /// Hidden-state dimensions are the sender's: any pair must be refused or decoded,
    /// never overflow. (Dimensions up to 2^31 only; see the ignored test below for the
    /// ones past it.)
    #[test]
    fn hidden_dimensions_from_the_sender_never_panic(
        rows in 0u32..(1 << 31),
        d in 0u32..(1 << 31),
        body in vec(any::<u8>(), 0..32),
    ) {
        let meta = ArStepMeta { session: 1, output_index: 0, hidden: Some((rows, d)), setup: None };
        let frame = reframe(&Message::ArStep(meta, ArPayload::Hidden(vec![])).encode(), &body);
        let _ = decode_metered(&frame)?;
    }
}

/// `f16_values` computes `expect * 2` with `expect = rows * d` from the sender's
/// metadata: two u32 dimensions past 2^31.5 overflow it (a panic under overflow
/// checks, a wrapped and meaningless length check without them).
#[test]
fn hidden_dimensions_near_u32_max_are_refused() {
    let meta = ArStepMeta {
        session: 1,
        output_index: 0,
        hidden: Some((u32::MAX, u32::MAX)),
        setup: None,
    };
    let frame = Message::ArStep(meta, ArPayload::Hidden(vec![0.0])).encode();
    let out = std::panic::catch_unwind(|| decode_frame(&frame, DEFAULT_MAX_FRAME));
    match out {
        Ok(r) => assert!(r.is_err(), "{r:?}"),
        Err(_) => panic!("decoding an ArStep with hidden (u32::MAX, u32::MAX) panicked"),
    }
}

// ---------------------------------------------------------------------------------------
// Update payloads (codec)
// ---------------------------------------------------------------------------------------

fn tensor_name() -> impl Strategy<Value = String> {
    "[a-z]{1,3}"
}

fn shapes() -> impl Strategy<Value = Shapes> {
    btree_map(tensor_name(), vec(0usize..5, 0..3), 1..4)
}

fn any_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::Fp32),
        Just(Codec::Fp16),
        (1usize..70).prop_map(|chunk| Codec::Int8 { chunk }),
        (1u32..=1000).prop_map(|k| Codec::TopK {
            fraction: k as f32 / 1000.0
        }),
    ]
}

/// A delta of the given shapes, values in fp16's range.
fn delta(shapes: Shapes) -> impl Strategy<Value = Arrays> {
    let parts: Vec<_> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            vec(-1.0e4f32..1.0e4, n).prop_map(move |data| {
                (
                    name.clone(),
                    Array {
                        shape: shape.clone(),
                        data,
                    },
                )
            })
        })
        .collect();
    parts.prop_map(|v| v.into_iter().collect::<Arrays>())
}

fn update() -> impl Strategy<Value = (Arrays, Codec)> {
    (shapes().prop_flat_map(delta), any_codec())
}

fn numel(s: &Shapes) -> usize {
    s.values().map(|v| v.iter().product::<usize>()).sum()
}

/// Decodes under the allocation meter; checks the budget and what a success returns.
fn check_decode(bytes: &[u8], expected: &Shapes, limit: usize) -> Result<(), TestCaseError> {
    let (out, peak) = meter::peak(|| codec::decode(bytes, expected, limit));
    if bytes.len() > limit {
        prop_assert!(
            matches!(out, Err(ProtocolError::Rejected(_))),
            "over the limit: {out:?}"
        );
        prop_assert!(peak < 1024, "refusing an oversized update allocated {peak}");
        return Ok(());
    }
    prop_assert!(
        peak <= budget(bytes.len(), 4 * numel(expected)),
        "decoding a {}-byte update allocated {peak} bytes",
        bytes.len()
    );
    if let Ok((arrays, _)) = out {
        prop_assert_eq!(arrays.len(), expected.len());
        for (name, shape) in expected {
            let a = &arrays[name];
            prop_assert_eq!(&a.shape, shape);
            prop_assert_eq!(a.data.len(), shape.iter().product::<usize>());
            prop_assert!(a.data.iter().all(|v| v.is_finite()));
        }
    }
    Ok(())
}

const DTYPES: &[(&str, usize)] = &[
    ("F32", 32),
    ("F16", 16),
    ("I8", 8),
    ("U32", 32),
    ("BF16", 16),
    ("F64", 64),
    ("U8", 8),
    ("BOOL", 8),
    ("I64", 64),
    ("F8_E4M3", 8),
    ("F4", 4),
];

/// Codec metadata a hostile sender might write.
fn codec_meta() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(
        0.95,
        prop_oneof![
            Just(r#"{"codec":"fp32"}"#.to_string()),
            Just(r#"{"codec":"fp16"}"#.to_string()),
            prop_oneof![Just(0usize), 1usize..8, any::<usize>()]
                .prop_map(|c| format!(r#"{{"codec":"int8","chunk":{c}}}"#)),
            prop_oneof![
                Just(0.0f32),
                Just(-1.0),
                Just(1.0),
                Just(1.5),
                Just(f32::MIN_POSITIVE),
                0.0f32..=1.0,
                any::<f32>().prop_filter("finite", |f| f.is_finite()),
            ]
            .prop_map(|f| format!(r#"{{"codec":"topk","fraction":{f:?}}}"#)),
            "\\PC{0,16}",
        ],
    )
}

/// A tensor entry of a hostile header: a name near the expected ones, a dtype, a shape
/// (sometimes the expected one, sometimes huge).
fn tensor_spec(names: Vec<String>) -> impl Strategy<Value = (String, usize, Vec<usize>)> {
    let name = prop_oneof![
        4 => (
            proptest::sample::select(names),
            proptest::sample::select(vec!["", "/scale", "/idx", "/val"]),
        )
            .prop_map(|(n, s)| format!("{n}{s}")),
        1 => "[a-z/]{1,6}",
    ];
    let dim = prop_oneof![
        8 => 0usize..6,
        1 => Just(usize::MAX),
        1 => Just(1usize << 40),
        1 => Just(1usize << 62),
    ];
    (name, 0..DTYPES.len(), vec(dim, 0..3))
}

/// Safetensors bytes with a header of the given entries: offsets that fit their shapes
/// when `consistent` (data zeros or random), or arbitrary ones.
fn safetensors_bytes(
    entries: &[(String, usize, Vec<usize>)],
    meta: &Option<String>,
    consistent: bool,
    fill: &[u8],
    offsets: &[(usize, usize)],
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = meta {
        header.insert("__metadata__".into(), serde_json::json!({ "codec": m }));
    }
    let mut at = 0usize;
    for (i, (name, dtype, shape)) in entries.iter().enumerate() {
        let (code, bits) = DTYPES[*dtype];
        let size = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(bits))
            .map(|b| b.div_ceil(8))
            .filter(|&b| b <= 4096);
        let (start, end) = match (consistent, size) {
            (true, Some(size)) => (at, at + size),
            _ => offsets[i % offsets.len().max(1)],
        };
        at = end.max(at);
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": code, "shape": shape, "data_offsets": [start, end] }),
        );
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    let data_len = if consistent {
        at.min(1 << 16)
    } else {
        fill.len()
    };
    out.extend((0..data_len).map(|i| fill.get(i % fill.len().max(1)).copied().unwrap_or(0)));
    out
}

#[allow(clippy::type_complexity)]
fn hostile_update() -> impl Strategy<Value = (Vec<u8>, Shapes)> {
    shapes().prop_flat_map(|expected| {
        let names: Vec<String> = expected.keys().cloned().collect();
        (
            Just(expected),
            vec(tensor_spec(names), 0..5),
            codec_meta(),
            any::<bool>(),
            prop_oneof![Just(vec![0u8]), vec(any::<u8>(), 0..64)],
            vec((0usize..64, 0usize..64), 1..4),
        )
            .prop_map(|(expected, entries, meta, consistent, fill, offsets)| {
                (
                    safetensors_bytes(&entries, &meta, consistent, &fill, &offsets),
                    expected,
                )
            })
    })
}

/// One change a hostile sender makes to an otherwise well-formed update header.
#[derive(Clone, Debug)]
enum Perturb {
    Dtype(Index, usize),
    Dim(Index, Index, usize),
    Rank(Index, Vec<usize>),
    Drop(Index),
    Extra(String, usize, Vec<usize>),
}

fn perturb() -> impl Strategy<Value = Perturb> {
    let dim = prop_oneof![0usize..8, Just(usize::MAX), Just(1usize << 40)];
    prop_oneof![
        (any::<Index>(), 0..DTYPES.len()).prop_map(|(i, d)| Perturb::Dtype(i, d)),
        (any::<Index>(), any::<Index>(), dim.clone()).prop_map(|(i, j, v)| Perturb::Dim(i, j, v)),
        (any::<Index>(), vec(dim.clone(), 0..3)).prop_map(|(i, s)| Perturb::Rank(i, s)),
        any::<Index>().prop_map(Perturb::Drop),
        ("[a-z/]{1,6}", 0..DTYPES.len(), vec(dim, 0..3))
            .prop_map(|(n, d, s)| Perturb::Extra(n, d, s)),
    ]
}

/// An update header that names exactly the tensors the receiver wants, in the codec's
/// dtypes and shapes, then takes a few hostile changes: reaches every codec's value
/// decoding (scales, indices, finiteness), not just the name check.
fn near_valid_update() -> impl Strategy<Value = (Vec<u8>, Shapes)> {
    (
        shapes(),
        0usize..4,
        prop_oneof![Just(0usize), 1usize..8, Just(usize::MAX)],
        prop_oneof![4 => 0.01f32..=1.0, 1 => Just(0.0f32), 1 => Just(1.5f32)],
        vec(any::<Index>(), 4),
        vec(perturb(), 0..3),
        prop_oneof![Just(vec![0u8]), vec(0u8..3, 1..8), vec(any::<u8>(), 1..64)],
    )
        .prop_map(|(expected, codec, chunk, fraction, ks, changes, fill)| {
            let meta = match codec {
                0 => r#"{"codec":"fp32"}"#.to_string(),
                1 => r#"{"codec":"fp16"}"#.to_string(),
                2 => format!(r#"{{"codec":"int8","chunk":{chunk}}}"#),
                _ => format!(r#"{{"codec":"topk","fraction":{fraction:?}}}"#),
            };
            let mut entries: Vec<(String, usize, Vec<usize>)> = Vec::new();
            for (i, (name, shape)) in expected.iter().enumerate() {
                let numel: usize = shape.iter().product();
                match codec {
                    0 => entries.push((name.clone(), 0, shape.clone())),
                    1 => entries.push((name.clone(), 1, shape.clone())),
                    2 => {
                        entries.push((name.clone(), 2, shape.clone()));
                        let scales = numel.div_ceil(chunk.max(1));
                        entries.push((format!("{name}/scale"), 0, vec![scales]));
                    }
                    _ => {
                        let k = ks[i % ks.len()].index(numel + 2);
                        entries.push((format!("{name}/idx"), 3, vec![k]));
                        entries.push((format!("{name}/val"), 1, vec![k]));
                    }
                }
            }
            for c in changes {
                if entries.is_empty() {
                    break;
                }
                match c {
                    Perturb::Dtype(i, d) => {
                        let i = i.index(entries.len());
                        entries[i].1 = d;
                    }
                    Perturb::Dim(i, j, v) => {
                        let i = i.index(entries.len());
                        let e = &mut entries[i];
                        if !e.2.is_empty() {
                            let j = j.index(e.2.len());
                            e.2[j] = v;
                        }
                    }
                    Perturb::Rank(i, s) => {
                        let i = i.index(entries.len());
                        entries[i].2 = s;
                    }
                    Perturb::Drop(i) => {
                        entries.remove(i.index(entries.len()));
                    }
                    Perturb::Extra(n, d, s) => entries.push((n, d, s)),
                }
            }
            let bytes = safetensors_bytes(&entries, &Some(meta), true, &fill, &[(0, 0)]);
            (bytes, expected)
        })
}

proptest! {
    #[test]
    fn updates_round_trip_with_their_shapes((d, c) in update()) {
        let shapes = codec::shapes_of(&d);
        let bytes = codec::encode(&d, c);
        let (back, codec) = codec::decode(&bytes, &shapes, bytes.len()).unwrap();
        prop_assert_eq!(codec, c);
        prop_assert_eq!(codec::shapes_of(&back), shapes.clone());
        if c == Codec::Fp32 {
            prop_assert_eq!(back, d);
        }
        check_decode(&bytes, &shapes, bytes.len())?;
        // One byte over the limit is refused before parsing.
        check_decode(&bytes, &shapes, bytes.len() - 1)?;
        match c {
            Codec::TopK { .. } => prop_assert!(codec::header_shapes(&bytes).is_err()),
            _ => prop_assert_eq!(codec::header_shapes(&bytes).unwrap(), shapes),
        }
    }

    #[test]
    fn mutated_updates_never_panic(
        (d, c) in update(),
        edits in vec((any::<Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let shapes = codec::shapes_of(&d);
        let mut bytes = codec::encode(&d, c);
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        check_decode(&bytes, &shapes, 1 << 20)?;
        let _ = codec::header_shapes(&bytes);
    }

    /// Updates encoded for other shapes (a sender lying about its block).
    #[test]
    fn updates_for_other_shapes_are_refused(
        (d, c) in update(),
        other in shapes(),
    ) {
        let bytes = codec::encode(&d, c);
        check_decode(&bytes, &other, 1 << 20)?;
        let mine = codec::shapes_of(&d);
        // A top-k body names its tensors but not their dense shapes: any shape with room
        // for its indices takes it.
        let differs = match c {
            Codec::TopK { .. } => !other.keys().eq(mine.keys()),
            _ => other != mine,
        };
        if differs {
            prop_assert!(codec::decode(&bytes, &other, 1 << 20).is_err());
        }
    }

    #[test]
    fn hostile_headers_never_panic_nor_overallocate(
        (bytes, expected) in hostile_update(),
        limit in prop_oneof![Just(usize::MAX), 0usize..4096],
    ) {
        check_decode(&bytes, &expected, limit)?;
        let (_, peak) = meter::peak(|| codec::header_shapes(&bytes));
        prop_assert!(peak <= budget(bytes.len(), 0), "header_shapes allocated {peak}");
    }

    #[test]
    fn near_valid_updates_never_panic_nor_overallocate(
        (bytes, expected) in near_valid_update(),
        limit in prop_oneof![4 => Just(usize::MAX), 1 => 0usize..4096],
    ) {
        check_decode(&bytes, &expected, limit)?;
        let (_, peak) = meter::peak(|| codec::header_shapes(&bytes));
        prop_assert!(peak <= budget(bytes.len(), 0), "header_shapes allocated {peak}");
    }

    #[test]
    fn arbitrary_update_bytes_never_panic(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..128),
            // A plausible header length, then anything.
            (0u64..120, vec(any::<u8>(), 0..128)).prop_map(|(n, rest)| {
                let mut b = n.to_le_bytes().to_vec();
                b.extend(rest);
                b
            }),
        ],
        expected in shapes(),
    ) {
        check_decode(&bytes, &expected, 1 << 20)?;
        let _ = codec::header_shapes(&bytes);
    }
}

/// A header declaring a tensor far larger than the bytes sent, under a small limit:
/// refused, with nothing of the declared size reserved.
#[test]
fn declared_sizes_are_never_allocated() {
    let expected: Shapes = BTreeMap::from([("w".to_string(), vec![1usize << 40])]);
    for (dtype, shape, end) in [
        ("F32", vec![1usize << 40], 4usize << 40),
        ("F32", vec![1usize << 40], 16),
        ("F16", vec![usize::MAX, 2], 16),
        ("I8", vec![0, usize::MAX], 0),
    ] {
        for meta in [
            r#"{"codec":"fp32"}"#,
            r#"{"codec":"fp16"}"#,
            r#"{"codec":"int8","chunk":1}"#,
            r#"{"codec":"topk","fraction":1.0}"#,
        ] {
            let header = serde_json::json!({
                "__metadata__": { "codec": meta },
                "w": { "dtype": dtype, "shape": shape, "data_offsets": [0, end] },
            });
            let text = serde_json::to_vec(&header).unwrap();
            let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&text);
            bytes.extend_from_slice(&[0u8; 16]);
            for limit in [64, 1024, bytes.len(), usize::MAX] {
                // The expected tensor itself is huge: only a top-k body could expand to
                // it, and top-k names no dense `w`, so every one of these is refused.
                let (out, peak) = meter::peak(|| codec::decode(&bytes, &expected, limit));
                assert!(out.is_err(), "{dtype} {shape:?} {meta}: {out:?}");
                assert!(peak < 64 * 1024, "{dtype} {shape:?} {meta}: peak {peak}");
            }
            let (_, peak) = meter::peak(|| codec::header_shapes(&bytes));
            assert!(peak < 64 * 1024, "header_shapes: peak {peak}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Signed requests
// ---------------------------------------------------------------------------------------

fn signer() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| Identity::from_secret(&[7; 32]).unwrap())
}

const SKEW: u64 = 60_000;

/// An HTTP method and path as a server sees them: no line breaks (HTTP carries none;
/// the signed message separates its fields with them).
fn method() -> impl Strategy<Value = String> {
    "[A-Z]{1,7}"
}

fn path() -> impl Strategy<Value = String> {
    "/[!-~]{0,30}"
}

#[derive(Debug, Clone)]
enum Tamper {
    Method(String),
    Path(String),
    Body(Vec<u8>),
    Time(u64),
    Nonce(String),
    Key,
    SigBit(Index, u8),
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        method().prop_map(Tamper::Method),
        path().prop_map(Tamper::Path),
        vec(any::<u8>(), 0..64).prop_map(Tamper::Body),
        (1u64..SKEW).prop_map(Tamper::Time),
        "[0-9a-f]{0,40}".prop_map(Tamper::Nonce),
        Just(Tamper::Key),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Tamper::SigBit(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn signed_requests_verify_as_sent_and_fail_under_any_change(
        method in method(),
        path in path(),
        body in vec(any::<u8>(), 0..64),
        time in 0u64..(1 << 50),
        drift in 0u64..=SKEW,
        change in tamper(),
    ) {
        let id = signer();
        let auth = sign(id, &method, &path, time, &body);
        let now = time + drift;
        verify_request(&auth, &method, &path, &body, now, SKEW).unwrap();
        let (mut a, mut m, mut p, mut b) = (auth.clone(), method.clone(), path.clone(), body.clone());
        match change {
            Tamper::Method(x) => m = x,
            Tamper::Path(x) => p = x,
            Tamper::Body(x) => b = x,
            Tamper::Time(dt) => a.time_ms = a.time_ms.wrapping_add(dt),
            Tamper::Nonce(x) => a.nonce = x,
            Tamper::Key => a.key = Identity::from_secret(&[8; 32]).unwrap().public_hex(),
            Tamper::SigBit(i, bit) => {
                let mut sig = hex::decode(&a.sig).unwrap();
                let i = i.index(sig.len());
                sig[i] ^= 1 << bit;
                a.sig = hex::encode(sig);
            }
        }
        let unchanged = a == auth && m == method && p == path && b == body;
        let out = verify_request(&a, &m, &p, &b, now, SKEW + SKEW);
        prop_assert_eq!(out.is_ok(), unchanged, "{:?}", out);
    }

    #[test]
    fn arbitrary_auth_headers_never_verify_nor_panic(
        key in prop_oneof!["\\PC{0,80}", "[0-9a-f]{64}"],
        nonce in "\\PC{0,40}",
        sig in prop_oneof!["\\PC{0,140}", "[0-9a-fA-F]{128}"],
        time_ms in any::<u64>(),
        now in any::<u64>(),
        skew in prop_oneof![Just(u64::MAX), any::<u64>()],
        method in "\\PC{0,8}",
        path in "\\PC{0,40}",
        body in vec(any::<u8>(), 0..64),
    ) {
        let auth = Auth { key, time_ms, nonce, sig };
        prop_assert!(verify_request(&auth, &method, &path, &body, now, skew).is_err());
    }
}

#[test]
fn a_valid_signature_with_every_field_replaced_in_turn() {
    // The mutation property above draws one change per case; here every field of one
    // request is changed in turn, with values that differ by a single character.
    let id = signer();
    let auth = sign(id, "POST", "/v1/updates/7", 1_000, b"body");
    verify_request(&auth, "POST", "/v1/updates/7", b"body", 1_000, SKEW).unwrap();
    let cases: Vec<(Auth, &str, &str, &[u8])> = vec![
        (auth.clone(), "PUT", "/v1/updates/7", b"body"),
        (auth.clone(), "POST", "/v1/updates/8", b"body"),
        (auth.clone(), "POST", "/v1/updates/7", b"bodY"),
        (
            Auth {
                time_ms: 1_001,
                ..auth.clone()
            },
            "POST",
            "/v1/updates/7",
            b"body",
        ),
        (
            Auth {
                nonce: format!("{}0", auth.nonce),
                ..auth.clone()
            },
            "POST",
            "/v1/updates/7",
            b"body",
        ),
    ];
    for (a, m, p, b) in cases {
        assert!(verify_request(&a, m, p, b, 1_000, SKEW).is_err(), "{m} {p}");
    }
}

// ---------------------------------------------------------------------------------------
// Receipts, tree heads and proofs
// ---------------------------------------------------------------------------------------

struct Log {
    coord: Identity,
    receipts: Vec<Receipt>,
    /// `heads[n]` is a signed head of the first `n` receipts.
    heads: Vec<TreeHead>,
}

const LOG_LEN: usize = 9;

fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let coord = Identity::from_secret(&[1; 32]).unwrap();
        let worker = Identity::from_secret(&[2; 32]).unwrap();
        let mut receipts = Vec::new();
        let mut tree = MemoryBackedTree::<LogHash, Vec<u8>>::new();
        let empty = <LogHash as ct_merkle::digest::Digest>::digest(b"");
        let mut heads = vec![TreeHead::sign(0, &empty, 0, &coord)];
        for i in 0..LOG_LEN as i64 {
            let claim = Claim {
                version: RECEIPT_VERSION,
                worker: worker.public_hex(),
                lease: i,
                block: (i % 3) as u32,
                base_version: 4,
                update_blake3: blake3::hash(&i.to_le_bytes()).to_hex().to_string(),
                steps: 100 + i,
                data_bytes: 1 << 20,
                local_loss: Some(2.5 + i as f64 / 7.0),
            };
            let sig = claim.sign(&worker);
            let accepted = i % 3 != 1;
            let decision = Decision {
                accepted,
                reason: (!accepted).then(|| "norm too large".into()),
                resulting_version: accepted.then_some(5),
                heldout_before: Some(3.0),
                heldout_after: Some(2.9),
                time_ms: 1_000 + i as u64,
                staleness: 0,
            };
            let r = Receipt::issue(claim, Some(sig), decision, &coord);
            tree.push(r.leaf_bytes());
            receipts.push(r);
            heads.push(TreeHead::sign(
                tree.len(),
                tree.root().as_bytes(),
                7,
                &coord,
            ));
        }
        Log {
            coord,
            receipts,
            heads,
        }
    })
}

/// The true inclusion proof of receipt `index` in the log of `size`.
fn true_inclusion(index: usize, size: usize) -> Vec<u8> {
    let l = log();
    let mut t = MemoryBackedTree::<LogHash, Vec<u8>>::new();
    for r in &l.receipts[..size] {
        t.push(r.leaf_bytes());
    }
    t.prove_inclusion(index).as_bytes().to_vec()
}

/// The true consistency proof from `old` to `new` receipts (both > 0).
fn true_consistency(old: usize, new: usize) -> Vec<u8> {
    let l = log();
    let mut t = MemoryBackedTree::<LogHash, Vec<u8>>::new();
    for r in &l.receipts[..new] {
        t.push(r.leaf_bytes());
    }
    t.prove_consistency(new - old).as_bytes().to_vec()
}

/// Proof bytes a forger might send: hex of digests, of odd lengths, or not hex.
fn proof_hex() -> impl Strategy<Value = String> {
    prop_oneof![
        (0usize..8)
            .prop_flat_map(|n| vec(any::<u8>(), 32 * n))
            .prop_map(hex::encode),
        vec(any::<u8>(), 0..100).prop_map(hex::encode),
        "[0-9a-fA-F]{0,130}",
        "\\PC{0,64}",
    ]
}

fn tree_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..20,
        1 => any::<u64>(),
        1 => (u64::MAX / 2 - 4)..=(u64::MAX / 2 + 4),
        1 => (0u32..64).prop_map(|k| 1u64 << k),
    ]
}

/// Lowercases the hex fields that no signature covers, which `hex::decode` reads
/// either way: a mutation that only changes their case changes nothing.
fn normalized(mut p: ReceiptProof) -> ReceiptProof {
    p.receipt.coordinator_sig.make_ascii_lowercase();
    p.head.sig.make_ascii_lowercase();
    p.proof.hashes.make_ascii_lowercase();
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn receipt_json_never_panics(bytes in vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_slice::<Claim>(&bytes);
        let _ = serde_json::from_slice::<Decision>(&bytes);
        let _ = serde_json::from_slice::<TreeHead>(&bytes).map(|h| h.verify());
        let _ = serde_json::from_slice::<InclusionProof>(&bytes);
        let _ = serde_json::from_slice::<ConsistencyProof>(&bytes);
        if let Ok(r) = serde_json::from_slice::<Receipt>(&bytes) {
            let _ = r.verify();
        }
        if let Ok(p) = serde_json::from_slice::<ReceiptProof>(&bytes) {
            prop_assert!(p.verify(None).is_err());
        }
    }

    /// A mutated receipt proof (the file `ledger prove` writes) never panics, and it
    /// verifies only if it still says exactly what the original said.
    #[test]
    fn mutated_receipt_proofs_verify_only_unchanged(
        index in 0..LOG_LEN,
        edits in vec((any::<Index>(), any::<u8>()), 1..3),
    ) {
        let l = log();
        let original = ReceiptProof {
            receipt: l.receipts[index].clone(),
            head: l.heads[LOG_LEN].clone(),
            proof: InclusionProof {
                index: index as u64,
                size: LOG_LEN as u64,
                hashes: hex::encode(true_inclusion(index, LOG_LEN)),
            },
        };
        original.verify(Some(&l.coord.public_hex())).unwrap();
        let mut bytes = serde_json::to_vec(&original).unwrap();
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        // Each part parses (or not) on its own too.
        let _ = serde_json::from_slice::<serde_json::Value>(&bytes).map(|v| {
            let _ = serde_json::from_value::<Receipt>(v["receipt"].clone()).map(|r| r.verify());
            let _ = serde_json::from_value::<TreeHead>(v["head"].clone()).map(|h| h.verify());
        });
        if let Ok(p) = serde_json::from_slice::<ReceiptProof>(&bytes) {
            let ok = p.verify(None).is_ok();
            let same = normalized(p) == original;
            prop_assert!(!ok || same, "a changed receipt proof verified");
        }
    }

    #[test]
    fn inclusion_accepts_only_the_true_proof(
        size in 1..=LOG_LEN,
        index in any::<Index>(),
        claimed in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        hashes in prop_oneof![Just(None), proof_hex().prop_map(Some)],
        flip in proptest::option::of((any::<Index>(), 0u8..8)),
    ) {
        let l = log();
        let index = index.index(size);
        let truth = true_inclusion(index, size);
        let mut proof = InclusionProof {
            index: claimed.unwrap_or(index as u64),
            size: size as u64,
            hashes: hashes.unwrap_or_else(|| hex::encode(&truth)),
        };
        if let (Some((at, bit)), Ok(mut b)) = (flip, hex::decode(&proof.hashes)) {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] ^= 1 << bit;
                proof.hashes = hex::encode(b);
            }
        }
        let out = verify_inclusion(&l.heads[size], &l.receipts[index], &proof);
        let genuine = proof.index == index as u64
            && hex::decode(&proof.hashes).ok().as_deref() == Some(&truth[..]);
        prop_assert_eq!(out.is_ok(), genuine, "{:?}", out);
        // The same proof of another receipt fails.
        let other = (index + 1) % LOG_LEN;
        if other != index {
            prop_assert!(verify_inclusion(&l.heads[size], &l.receipts[other], &proof).is_err());
        }
    }

    #[test]
    fn consistency_accepts_only_the_true_proof(
        new in 0..=LOG_LEN,
        old in any::<Index>(),
        hashes in prop_oneof![Just(None), proof_hex().prop_map(Some)],
        flip in proptest::option::of((any::<Index>(), 0u8..8)),
        swap in any::<bool>(),
    ) {
        let l = log();
        let old = old.index(new + 1);
        let truth = if old == 0 { vec![] } else { true_consistency(old, new) };
        let mut proof = ConsistencyProof {
            old_size: old as u64,
            new_size: new as u64,
            hashes: hashes.unwrap_or_else(|| hex::encode(&truth)),
        };
        if let (Some((at, bit)), Ok(mut b)) = (flip, hex::decode(&proof.hashes)) {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] ^= 1 << bit;
                proof.hashes = hex::encode(b);
            }
        }
        let (a, b) = if swap { (new, old) } else { (old, new) };
        if swap {
            proof = ConsistencyProof { old_size: a as u64, new_size: b as u64, ..proof };
        }
        let out = verify_consistency(&l.heads[a], &l.heads[b], &proof);
        let genuine = (!swap || a == b)
            && hex::decode(&proof.hashes).ok().as_deref() == Some(&truth[..]);
        prop_assert_eq!(out.is_ok(), genuine, "{:?}", out);
    }

    /// Heads the coordinator really signed, of any size and root (a compromised or
    /// buggy coordinator), with any proof: refused, never a panic inside the Merkle
    /// arithmetic.
    #[test]
    fn proofs_against_signed_heads_of_any_size_never_panic(
        old_size in tree_size(),
        new_size in tree_size(),
        roots in any::<([u8; 32], [u8; 32])>(),
        index in prop_oneof![0u64..20, any::<u64>()],
        hashes in proof_hex(),
        receipt in 0..LOG_LEN,
    ) {
        let l = log();
        let old = TreeHead::sign(old_size, &roots.0, 1, &l.coord);
        let new = TreeHead::sign(new_size, &roots.1, 2, &l.coord);
        let inc = InclusionProof { index, size: new_size, hashes: hashes.clone() };
        prop_assert!(verify_inclusion(&new, &l.receipts[receipt], &inc).is_err());
        let con = ConsistencyProof { old_size, new_size, hashes };
        let out = verify_consistency(&old, &new, &con);
        // Only the empty log's trivial proof can pass, and random roots are not the
        // empty tree's.
        prop_assert!(out.is_err(), "{:?}", out);
    }
}
