//! What each host serves: the `serve` arguments of the three hosts for each system, from
//! trained runs or random weights of a logical shape, with the model's layer applications
//! split over the hosts the same way for the diffusion blocks and the AR pipeline.
use std::path::Path;

use anyhow::{bail, Result};
use blocktrain_model::logical::LogicalShape;

use super::{BenchInferenceArgs, HOSTS};

/// `serve` arguments of each host (host k at index k-1), diffusion and AR, and a
/// description of the weights.
pub(super) struct Sources {
    pub(super) diffusion: Vec<Vec<String>>,
    pub(super) edm: Vec<Vec<String>>,
    pub(super) ar: Vec<Vec<String>>,
    pub(super) weights: String,
    /// Layer applications host k holds (index k-1), the same in every system.
    pub(super) host_layers: Vec<i64>,
}

/// `serve` arguments of host k (1..=3) for one block of a diffusion run.
fn block_sources(run: &Path) -> Vec<Vec<String>> {
    (1..=HOSTS)
        .map(|k| {
            vec![
                "--checkpoint".to_string(),
                run.to_string_lossy().into_owned(),
                "--blocks".to_string(),
                k.to_string(),
            ]
        })
        .collect()
}

/// `total` layer applications split over the hosts as evenly as possible (host k at index
/// k-1); the extra ones go to the hosts a traversal reaches first (host 3, then host 2).
pub(super) fn host_layers(total: i64) -> Vec<i64> {
    let (hosts, base) = (HOSTS as i64, total / HOSTS as i64);
    let extra = total % hosts;
    (1..=hosts)
        .map(|k| base + i64::from(k > hosts - extra))
        .collect()
}

/// The AR layers host k (1..=3) serves when host j holds `per[j-1]` of them: host 3 holds
/// the first (it embeds), host 1 the last (it samples), so AR hops go 3 -> 2 -> 1 like
/// diffusion's.
fn ar_layers_of_host(k: usize, per: &[i64]) -> String {
    let before: i64 = per[k..].iter().sum(); // hosts k+1..=3 come first
    format!("{}..{}", before + 1, before + per[k - 1])
}

pub(super) fn sources(args: &BenchInferenceArgs) -> Result<Sources> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    if let (Some(bt), Some(ar)) = (&args.checkpoint, &args.ar_checkpoint) {
        let ar_run = blocktrain_model::run::RunDir::open(ar)?;
        let layers = ar_run.manifest.model.n_layers;
        if layers % HOSTS as i64 != 0 {
            bail!("--ar-checkpoint has {layers} layers; the bench splits them evenly over 3 hosts");
        }
        let per = host_layers(layers);
        let diffusion = block_sources(bt);
        let edm = args
            .edm_checkpoint
            .as_deref()
            .map_or_else(Vec::new, block_sources);
        let arv = (1..=HOSTS as usize)
            .map(|k| {
                let r = ar_layers_of_host(k, &per);
                s(&["--checkpoint", &ar.to_string_lossy(), "--blocks", &r])
            })
            .collect();
        return Ok(Sources {
            diffusion,
            edm,
            ar: arv,
            weights: format!("trained: {} and {}", bt.display(), ar.display()),
            host_layers: per,
        });
    }
    let total = args
        .total_layers
        .map_or(args.shape.n_layers * HOSTS as i64, i64::from);
    if total < HOSTS as i64 {
        bail!("--total-layers {total}: every one of the {HOSTS} hosts needs a layer");
    }
    let per = host_layers(total);
    // Only an uneven split needs the per-block list (an even one keeps the model id).
    let block_layers = per
        .iter()
        .any(|&n| n != args.shape.n_layers)
        .then(|| per.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
    let shape = args.shape.to_string();
    let logical_blocks = |shape: &str| -> Vec<Vec<String>> {
        (1..=HOSTS)
            .map(|k| {
                let mut a = s(&["--logical-shape", shape, "--total", "3"]);
                a.extend(s(&["--blocks", &k.to_string()]));
                if let Some(list) = &block_layers {
                    a.extend(s(&["--block-layers", list]));
                }
                a
            })
            .collect()
    };
    let diffusion = logical_blocks(&shape);
    let edm_shape = LogicalShape {
        embed: Some(args.embed_dim),
        ..args.shape.clone()
    };
    let edm = logical_blocks(&edm_shape.to_string());
    let total_s = total.to_string();
    let arv = (1..=HOSTS as usize)
        .map(|k| {
            let r = ar_layers_of_host(k, &per);
            s(&[
                "--logical-shape",
                &shape,
                "--ar",
                "--total",
                &total_s,
                "--blocks",
                &r,
            ])
        })
        .collect();
    let tied = match args.shape.tie {
        1 => String::new(),
        k => format!(
            " (tied: {k} consecutive layer applications share one physical layer's weights)"
        ),
    };
    Ok(Sources {
        diffusion,
        edm,
        ar: arv,
        weights: format!(
            "random weights{tied}, block shape {shape} (edm: embed={}); {total} layer applications \
             in all, hosts 1..3 hold {per:?} in both systems; AR: those {total} layers",
            args.embed_dim
        ),
        host_layers: per,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_split_over_the_hosts_with_the_extra_ones_first() {
        assert_eq!(host_layers(95), vec![31, 32, 32]);
        assert_eq!(host_layers(96), vec![32, 32, 32]);
        assert_eq!(host_layers(4), vec![1, 1, 2]);
        let per = host_layers(95);
        let ranges: Vec<String> = (1..=3).map(|k| ar_layers_of_host(k, &per)).collect();
        assert_eq!(ranges, ["65..95", "33..64", "1..32"]);
        assert_eq!(ar_layers_of_host(2, &[2, 2, 2]), "3..4");
    }
}
