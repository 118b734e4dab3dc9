//! Device choice and CPU threading.
use tch::Device;

use crate::{ModelError, Result};

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "cuda:0" => cuda(0),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => cuda(n),
            None => Err(ModelError::Config(format!(
                "unknown device '{other}' (use cpu, cuda, cuda:N or auto)"
            ))),
        },
    }
}

fn cuda(n: usize) -> Result<Device> {
    if tch::Cuda::is_available() && (n as i64) < tch::Cuda::device_count() {
        Ok(Device::Cuda(n))
    } else {
        Err(ModelError::Config(format!(
            "cuda:{n} requested but this libtorch sees no such CUDA device"
        )))
    }
}

/// Pins libtorch's intra-op threads to the number of cores (or `threads` when given):
/// oversubscribing 2 cores costs more than it gains.
pub fn pin_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    tch::set_num_threads(n as i32);
}
