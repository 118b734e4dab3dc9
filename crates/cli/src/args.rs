//! Flag groups shared by several subcommands.
use anyhow::Result;
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
