use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::Dtype;

use super::encode::{le_bytes, Raw};
use super::*;

fn delta() -> Arrays {
    let mut m = Arrays::new();
    m.insert(
        "w".into(),
        Array {
            shape: vec![4, 100],
            data: (0..400)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
                .collect(),
        },
    );
    m.insert(
        "b".into(),
        Array {
            shape: vec![3],
            data: vec![0.5, -0.25, 0.0],
        },
    );
    m
}

fn max_err(a: &Arrays, b: &Arrays) -> f32 {
    a.iter()
        .flat_map(|(n, v)| v.data.iter().zip(&b[n].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn codecs_round_trip_within_their_precision_and_shrink() {
    let d = delta();
    let fp32 = encode(&d, Codec::Fp32);
    for (codec, tol) in [
        (Codec::Fp32, 0.0),
        (Codec::Fp16, 3e-4),
        (Codec::Int8 { chunk: 64 }, 0.5 / 127.0 / 2.0 + 1e-6),
    ] {
        let bytes = encode(&d, codec);
        let (back, c) = decode(&bytes, &shapes_of(&d), 1 << 20).unwrap();
        assert_eq!(c, codec);
        assert!(
            max_err(&d, &back) <= tol,
            "{codec:?}: {}",
            max_err(&d, &back)
        );
        if codec != Codec::Fp32 {
            assert!(bytes.len() < fp32.len(), "{codec:?} should be smaller");
        }
    }
    let (topk, _) = decode(
        &encode(&d, Codec::TopK { fraction: 0.1 }),
        &shapes_of(&d),
        1 << 20,
    )
    .unwrap();
    let kept = topk["w"].data.iter().filter(|v| **v != 0.0).count();
    assert!((35..=40).contains(&kept), "{kept}");
}

#[test]
fn error_feedback_carries_what_compression_dropped() {
    let d = delta();
    let codec = Codec::TopK { fraction: 0.1 };
    let rounds = 20;
    let mean_err = |feedback: bool| {
        let mut ef = ErrorFeedback::default();
        let mut total = vec![0f32; 400];
        for _ in 0..rounds {
            let bytes = if feedback {
                ef.encode(&d, codec)
            } else {
                encode(&d, codec)
            };
            let (sent, _) = decode(&bytes, &shapes_of(&d), 1 << 20).unwrap();
            total
                .iter_mut()
                .zip(&sent["w"].data)
                .for_each(|(t, s)| *t += s);
        }
        total
            .iter()
            .zip(&d["w"].data)
            .map(|(t, v)| (t - rounds as f32 * v).abs())
            .sum::<f32>()
            / 400.0
    };
    // Without feedback the small 90% of entries are never sent; with it they arrive late.
    let (with, without) = (mean_err(true), mean_err(false));
    assert!(
        with < without / 3.0,
        "with feedback {with}, without {without}"
    );
}

#[test]
fn hostile_updates_are_rejected_with_reasons() {
    let d = delta();
    let s = shapes_of(&d);
    let good = encode(&d, Codec::Fp16);
    assert!(decode(&good, &s, 100)
        .unwrap_err()
        .to_string()
        .contains("exceeds"));
    assert!(matches!(
        decode(&good[..good.len() - 1], &s, 1 << 20),
        Err(ProtocolError::Malformed(_))
    ));
    let mut wrong = s.clone();
    wrong.insert("w".into(), vec![400]);
    assert!(decode(&good, &wrong, 1 << 20)
        .unwrap_err()
        .to_string()
        .contains("shape"));
    let mut more = s.clone();
    more.insert("extra".into(), vec![1]);
    assert!(decode(&good, &more, 1 << 20).is_err());
    let mut nan = d.clone();
    nan.get_mut("b").unwrap().data[1] = f32::NAN;
    assert!(decode(&encode(&nan, Codec::Fp32), &s, 1 << 20)
        .unwrap_err()
        .to_string()
        .contains("NaN"));
    assert!(decode(b"garbage", &s, 1 << 20).is_err());
    assert!(Codec::parse("int8:0").is_err() && Codec::parse("topk:2").is_err());
    assert_eq!(
        Codec::parse("int8:128").unwrap(),
        Codec::Int8 { chunk: 128 }
    );
}

#[test]
fn codec_parameters_from_the_sender_are_checked() {
    let d = delta();
    let s = shapes_of(&d);
    for bad in [
        r#"{"codec":"int8","chunk":0}"#,
        r#"{"codec":"topk","fraction":0.0}"#,
        r#"{"codec":"topk","fraction":2.0}"#,
    ] {
        // An fp32 body labelled with hostile parameters: rejected, never a panic.
        let raws: BTreeMap<String, Raw> = d
            .iter()
            .map(|(n, a)| {
                let bytes = le_bytes(&a.data, f32::to_le_bytes);
                (
                    n.clone(),
                    Raw {
                        dtype: Dtype::F32,
                        shape: a.shape.clone(),
                        bytes,
                    },
                )
            })
            .collect();
        let meta = HashMap::from([("codec".to_string(), bad.to_string())]);
        let relabeled =
            safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), Some(meta)).unwrap();
        let e = decode(&relabeled, &s, 1 << 20).unwrap_err();
        assert!(
            e.to_string().contains("chunk 0") || e.to_string().contains("fraction"),
            "{e}"
        );
    }
}
