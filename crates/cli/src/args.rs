//! Flag groups shared by several subcommands.
use anyhow::Result;
use blocktrain_model::config::EdmConfig;
use clap::Args;
use tch::Device;

/// Where tensors live and how many CPU threads they use.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N, or auto (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Intra-op CPU threads (default: number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl DeviceArgs {
    /// Parses the device and pins CPU threads.
    pub fn setup(&self) -> Result<Device> {
        let device = blocktrain_model::device::parse_device(&self.device)?;
        blocktrain_model::device::pin_threads(self.threads);
        Ok(device)
    }
}

/// A client's key for block servers that authenticate their clients (`serve
/// --allow-keys` / `--join-secret-file`).
#[derive(Args, Clone, Debug, Default)]
pub struct ClientKeyArgs {
    /// This client's key file (hex secret seed, created on first use, mode 0600): it
    /// signs each connection's Hello to the block servers.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
    /// The route's join secret, in this file's first line, when its servers ask one.
    #[arg(long)]
    pub join_secret_file: Option<std::path::PathBuf>,
}

impl ClientKeyArgs {
    /// The credentials these flags name, set on `limits` (a join secret alone signs
    /// with a fresh key).
    pub fn apply(
        &self,
        limits: blocktrain_serve::hop::HopLimits,
    ) -> Result<blocktrain_serve::hop::HopLimits> {
        use blocktrain_serve::server::auth;
        if self.key.is_none() && self.join_secret_file.is_none() {
            return Ok(limits);
        }
        let identity = match &self.key {
            Some(p) => auth::load_or_create_key(p)?,
            None => blocktrain_protocol::identity::Identity::generate(),
        };
        let join_secret = self
            .join_secret_file
            .as_deref()
            .map(auth::load_join_secret)
            .transpose()?;
        Ok(blocktrain_serve::hop::HopLimits {
            credentials: Some(std::sync::Arc::new(blocktrain_serve::hop::Credentials {
                identity,
                join_secret,
            })),
            ..limits
        })
    }
}

/// Parses `0,0.3,0.6,1` into boundaries.
pub fn parse_boundaries(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|e| anyhow::anyhow!("bad boundary '{v}': {e}"))
        })
        .collect()
}

/// Embedding-diffusion settings (`--objective edm` / `edm-e2e`); unset flags keep the
/// defaults of [`EdmConfig`] (the BlockTrain paper's sigma in [1, 10], DiffusionBlocks'
/// lognormal and overlap).
#[derive(Args, Clone, Debug, Default)]
pub struct EdmArgs {
    /// Width of the fixed byte embedding the noise is added to.
    #[arg(long)]
    pub embed_dim: Option<i64>,
    /// RMS of one embedding coordinate (EDM's sigma_data).
    #[arg(long)]
    pub sigma_data: Option<f64>,
    /// Lowest noise level (the paper: 1, against target leakage).
    #[arg(long)]
    pub sigma_min: Option<f64>,
    /// Highest noise level (the paper: 10).
    #[arg(long)]
    pub sigma_max: Option<f64>,
    /// Mean of ln sigma in training.
    #[arg(long, allow_negative_numbers = true)]
    pub p_mean: Option<f64>,
    /// Standard deviation of ln sigma in training.
    #[arg(long)]
    pub p_std: Option<f64>,
    /// DiffusionBlocks' overlap gamma between neighbouring blocks (training only).
    #[arg(long)]
    pub overlap: Option<f64>,
}

impl EdmArgs {
    /// The settings these flags give, on top of the defaults; `seed` seeds the table.
    pub fn config(&self, seed: u64) -> Result<EdmConfig> {
        let d = EdmConfig::default();
        let cfg = EdmConfig {
            embed_dim: self.embed_dim.unwrap_or(d.embed_dim),
            sigma_data: self.sigma_data.unwrap_or(d.sigma_data),
            sigma_min: self.sigma_min.unwrap_or(d.sigma_min),
            sigma_max: self.sigma_max.unwrap_or(d.sigma_max),
            p_mean: self.p_mean.unwrap_or(d.p_mean),
            p_std: self.p_std.unwrap_or(d.p_std),
            overlap: self.overlap.unwrap_or(d.overlap),
            embed_seed: seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether any flag was given (they only apply to the embedding family).
    pub fn any(&self) -> bool {
        self.embed_dim.is_some()
            || self.sigma_data.is_some()
            || self.sigma_min.is_some()
            || self.sigma_max.is_some()
            || self.p_mean.is_some()
            || self.p_std.is_some()
            || self.overlap.is_some()
    }
}
