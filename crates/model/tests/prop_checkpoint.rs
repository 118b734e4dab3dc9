//! Property tests of checkpoint decoding: safetensors bytes from disk or a peer, parsed
//! by `from_bytes` and loaded by `load_strict` into a fixed small network. Arbitrary,
//! mutated and hostile-header bytes give a value or an error, never a panic, and a
//! refused load leaves the target untouched.
use std::collections::BTreeMap;

use blocktrain_model::checkpoint::NamedTensors;
use blocktrain_model::checkpoint::{check_compatible, from_bytes, load_strict, to_bytes};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use tch::{Kind, Tensor};

/// The network checkpoints are loaded into: a float vector, a half matrix, an integer
/// column.
fn target() -> NamedTensors {
    let mut m = NamedTensors::new();
    m.insert("a".into(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]));
    m.insert(
        "h".into(),
        Tensor::from_slice(&[0.5f32, -0.5, 0.25, 4.0])
            .to_kind(Kind::Half)
            .view([2, 2]),
    );
    m.insert("b".into(), Tensor::from_slice(&[4i64, 5]).view([2, 1]));
    m
}

fn snapshot(t: &NamedTensors) -> Vec<Vec<f64>> {
    t.values()
        .map(|v| Vec::<f64>::try_from(v.to_kind(Kind::Double).flatten(0, -1)).unwrap())
        .collect()
}

/// A checkpoint of the target's names, shapes and dtypes with other finite values.
fn checkpoint() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(-1.0e3f32..1.0e3, 3),
        vec(-60.0f32..60.0, 4),
        vec(any::<i64>(), 2),
        proptest::collection::btree_map("[a-z]{1,4}", "\\PC{0,8}", 0..3),
    )
        .prop_map(|(a, h, b, meta)| {
            let mut m = NamedTensors::new();
            m.insert("a".into(), Tensor::from_slice(&a));
            m.insert(
                "h".into(),
                Tensor::from_slice(&h).to_kind(Kind::Half).view([2, 2]),
            );
            m.insert("b".into(), Tensor::from_slice(&b).view([2, 1]));
            to_bytes(&m, &meta).unwrap()
        })
}

/// Parses and, when that works, checks and loads into a fresh target. A load that is
/// refused must leave the target as it was; one that succeeds must copy exactly.
fn exercise(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok((incoming, _meta)) = from_bytes(bytes) else {
        return Ok(());
    };
    let t = target();
    let before = snapshot(&t);
    let compatible = check_compatible(&t, &incoming).is_ok();
    let loaded = load_strict(&t, &incoming);
    prop_assert_eq!(loaded.is_ok(), compatible);
    if loaded.is_ok() {
        prop_assert_eq!(snapshot(&t), snapshot(&incoming));
    } else {
        prop_assert_eq!(snapshot(&t), before);
    }
    Ok(())
}

const DTYPES: &[(&str, usize)] = &[
    ("F32", 32),
    ("F16", 16),
    ("BF16", 16),
    ("F64", 64),
    ("I64", 64),
    ("I32", 32),
    ("I8", 8),
    ("U8", 8),
    ("BOOL", 8),
    ("U16", 16),
    ("U32", 32),
    ("U64", 64),
    ("I16", 16),
    ("F8_E4M3", 8),
    ("F8_E5M2", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("E8M0", 8),
    ("C64", 64),
];

/// A tensor entry of a hostile header: a target name or another, any dtype, a shape
/// that may hold dimensions no tensor library can make (zero elements with a dimension
/// past `i64::MAX` passes safetensors' own checks).
fn entry() -> impl Strategy<Value = (String, usize, Vec<usize>)> {
    let dim = prop_oneof![
        8 => 0usize..5,
        1 => Just(usize::MAX),
        1 => Just(1usize << 63),
        1 => Just(1usize << 40),
    ];
    (
        prop_oneof![
            3 => proptest::sample::select(vec!["a", "h", "b"]).prop_map(str::to_string),
            1 => "[a-z]{1,3}",
        ],
        0..DTYPES.len(),
        vec(dim, 0..4),
    )
}

/// The target's own entries with up to three hostile changes (a dtype, a dimension, a
/// missing or an extra tensor): reaches the shape, dtype and finiteness checks.
fn near_target() -> impl Strategy<Value = Vec<(String, usize, Vec<usize>)>> {
    let change = (0u8..4, any::<Index>(), any::<Index>(), entry());
    vec(change, 0..3).prop_map(|changes| {
        let mut e: Vec<(String, usize, Vec<usize>)> = vec![
            ("a".into(), 0, vec![3]),
            ("h".into(), 1, vec![2, 2]),
            ("b".into(), 4, vec![2, 1]),
        ];
        for (what, i, j, (name, dtype, shape)) in changes {
            if e.is_empty() {
                break;
            }
            let i = i.index(e.len());
            match what {
                0 => e[i].1 = dtype,
                1 if !e[i].2.is_empty() => {
                    let j = j.index(e[i].2.len());
                    e[i].2[j] = shape.first().copied().unwrap_or(1);
                }
                1 => e[i].2 = shape,
                2 => {
                    e.remove(i);
                }
                _ => e.push((name, dtype, shape)),
            }
        }
        e
    })
}

/// Safetensors bytes of `entries`, offsets matching their shapes where they fit in 4
/// KiB (data from `fill`), and `bad` offsets where they do not.
fn safetensors_bytes(entries: &[(String, usize, Vec<usize>)], fill: &[u8], bad: usize) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, dtype, shape) in entries {
        let (code, bits) = DTYPES[*dtype];
        let size = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(bits))
            .filter(|b| b % 8 == 0)
            .map(|b| b / 8)
            .filter(|&b| b <= 4096)
            .unwrap_or(bad);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": code,
                "shape": shape,
                "data_offsets": [at, at.saturating_add(size)],
            }),
        );
        at = at.saturating_add(size);
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend((0..at.min(1 << 16)).map(|i| fill[i % fill.len()]));
    out
}

// Default case counts (256): each case crosses into libtorch only on tiny tensors.
proptest! {
    #[test]
    fn valid_checkpoints_load_exactly(bytes in checkpoint()) {
        let (incoming, _) = from_bytes(&bytes).unwrap();
        check_compatible(&target(), &incoming).unwrap();
        exercise(&bytes)?;
    }

    #[test]
    fn mutated_checkpoints_never_panic(
        bytes in checkpoint(),
        edits in vec((any::<Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let mut bytes = bytes;
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        exercise(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..128),
            (0u64..120, vec(any::<u8>(), 0..128)).prop_map(|(n, rest)| {
                let mut b = n.to_le_bytes().to_vec();
                b.extend(rest);
                b
            }),
        ],
    ) {
        exercise(&bytes)?;
    }

    #[test]
    fn hostile_headers_never_panic(
        entries in prop_oneof![vec(entry(), 0..5), near_target()],
        fill in prop_oneof![
            Just(vec![0u8]),
            // NaN and Inf patterns for every float width.
            Just(vec![0xff]),
            vec(any::<u8>(), 1..32),
        ],
        bad in prop_oneof![0usize..16, Just(usize::MAX / 2)],
    ) {
        exercise(&safetensors_bytes(&entries, &fill, bad))?;
    }
}

/// The cases the strategies above reach only by chance, each on its own.
#[test]
fn edge_case_headers_never_panic() {
    let cases: Vec<Vec<(String, usize, Vec<usize>)>> = vec![
        // Zero elements, a dimension past i64::MAX.
        vec![("a".into(), 0, vec![0, usize::MAX])],
        vec![("a".into(), 0, vec![usize::MAX, 0])],
        vec![("a".into(), 0, vec![1 << 63, 0, 3])],
        // Zero elements, dimensions whose product overflows i64 without the zero.
        vec![("a".into(), 0, vec![0, 1 << 40, 1 << 40])],
        // Right names, wrong dtypes (unsupported and sub-byte ones included).
        vec![
            ("a".into(), 16, vec![3]),
            ("h".into(), 1, vec![2, 2]),
            ("b".into(), 4, vec![2, 1]),
        ],
        vec![
            ("a".into(), 15, vec![4]),
            ("h".into(), 1, vec![2, 2]),
            ("b".into(), 4, vec![2, 1]),
        ],
        // Right names, dtypes and shapes, all-ones bytes: NaN floats.
        vec![
            ("a".into(), 0, vec![3]),
            ("h".into(), 1, vec![2, 2]),
            ("b".into(), 4, vec![2, 1]),
        ],
    ];
    for entries in cases {
        for fill in [vec![0u8], vec![0xff]] {
            let bytes = safetensors_bytes(&entries, &fill, 0);
            exercise(&bytes).unwrap_or_else(|e| panic!("{entries:?}: {e}"));
        }
    }
    // The NaN checkpoint parses, and is refused by the load.
    let nan = safetensors_bytes(
        &[
            ("a".into(), 0, vec![3]),
            ("h".into(), 1, vec![2, 2]),
            ("b".into(), 4, vec![2, 1]),
        ],
        &[0xff],
        0,
    );
    let (incoming, _) = from_bytes(&nan).unwrap();
    assert!(check_compatible(&target(), &incoming).is_err());
}

/// `to_bytes` of no tensors and no metadata writes a header `{},"__metadata__":{}}`
/// that `from_bytes` (rightly) refuses: safetensors 0.8.0's `Serialize for Metadata`
/// sizes its JSON map as tensors + metadata *keys*, so an empty metadata map declares
/// a map of 0 entries and serde_json closes it before the `__metadata__` entry.
/// `to_bytes` passes `Some(empty map)` instead of `None` for empty metadata.
#[test]
fn an_empty_checkpoint_round_trips() {
    let bytes = to_bytes(&NamedTensors::new(), &BTreeMap::new()).unwrap();
    let r = from_bytes(&bytes);
    assert!(r.is_ok(), "{:?}", r.err());
}
