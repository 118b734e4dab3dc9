//! Logical shapes: per-block depths (`--block-layers`) and tied layers reach the networks.
use blocktrain_model::logical::LogicalShape;
use blocktrain_protocol::frame::BlockRange;
use tch::Device;

use super::{Hosted, Role, Source};

fn shape() -> LogicalShape {
    "d=32,layers=4,heads=2,dtype=f32,window=16,tie=4"
        .parse()
        .unwrap()
}

fn load(blocks: &str, ar: bool, total: u32, per: Option<&[u32]>) -> Result<Hosted, String> {
    let shape = shape();
    let source = Source::Logical {
        shape: &shape,
        ar,
        total,
        seed: 0,
        block_layers: per,
    };
    let blocks: BlockRange = blocks.parse().unwrap();
    Hosted::load(source, blocks, Device::Cpu, 64).map_err(|e| e.to_string())
}

/// (applications, physical layers) of each network the server holds.
fn depths(h: &Hosted) -> Vec<(usize, usize)> {
    let of = |n: &super::Net| (n.net.n_layers(), n.net.physical_layers());
    match &h.role {
        Role::Blocks { nets, .. } | Role::Latent { nets, .. } => nets.iter().map(of).collect(),
        Role::Ar { net, .. } => vec![of(net)],
    }
}

#[test]
fn block_layers_set_each_blocks_depth_and_join_the_model_id() {
    let per = [3, 4, 5];
    let low = load("1..2", false, 3, Some(&per)).unwrap();
    let top = load("3", false, 3, Some(&per)).unwrap();
    // Tied 4 to a layer: 3 and 4 applications are one physical layer, 5 are two.
    assert_eq!(depths(&low), vec![(3, 1), (4, 1)]);
    assert_eq!(depths(&top), vec![(5, 2)]);
    assert_eq!(low.info.model_id, top.info.model_id, "one route, one model");
    let even = load("3", false, 3, None).unwrap();
    assert_eq!(depths(&even), vec![(4, 1)]);
    assert_ne!(even.info.model_id, top.info.model_id);
    let out = top
        .denoise(
            &[1, 2, 256, 256],
            None,
            &blocktrain_protocol::frame::Sampling {
                steps_per_block: 2,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                heun: false,
            },
            7,
        )
        .unwrap();
    assert_eq!(out.0.len(), 4);
}

#[test]
fn bad_block_layers_are_refused() {
    let err = |r: Result<Hosted, String>| r.err().expect("refused");
    assert!(err(load("1", false, 3, Some(&[3, 4]))).contains("lists 2 blocks"));
    assert!(err(load("1", false, 3, Some(&[3, 0, 4]))).contains("0 layers"));
    assert!(err(load("1..2", true, 8, Some(&[3, 4]))).contains("AR stage"));
}

#[test]
fn an_ar_stage_of_a_tied_shape_applies_its_layers_range() {
    // 95 layer applications over 3 stages, tied 32 to a physical layer.
    let mut shape = shape();
    shape.tie = 32;
    let source = |shape| Source::Logical {
        shape,
        ar: true,
        total: 95,
        seed: 0,
        block_layers: None,
    };
    let last = Hosted::load(source(&shape), "65..95".parse().unwrap(), Device::Cpu, 64).unwrap();
    assert_eq!(depths(&last), vec![(31, 1)]);
    let mid = Hosted::load(source(&shape), "33..64".parse().unwrap(), Device::Cpu, 64).unwrap();
    assert_eq!(depths(&mid), vec![(32, 1)]);
    assert_eq!(mid.info.model_id, last.info.model_id);
}
