//! `blocktrain link`: an emulated WAN link (one-way delay and rate per direction) in front
//! of a TCP service, e.g. the coordinator, until Ctrl-C.
use std::net::SocketAddr;

use anyhow::Result;
use blocktrain_wanlink::{spawn_link_thread, wait_for_ctrl_c, LinkSpec};
use clap::Args;

/// Flags of `blocktrain link`.
#[derive(Args, Debug)]
pub struct LinkArgs {
    /// Address clients connect to (port 0 = any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address every connection is forwarded to.
    #[arg(long, value_name = "ADDR")]
    pub upstream: SocketAddr,
    /// One-way delay and rate, each direction: DELAY[,RATE], e.g. 25ms,100mbit or 40ms.
    #[arg(long, value_name = "SPEC", default_value = "25ms,100mbit")]
    pub link: LinkSpec,
}

/// Runs the link until Ctrl-C, then prints what went through it.
pub fn run(args: &LinkArgs) -> Result<()> {
    let link = spawn_link_thread(args.listen, args.upstream, args.link)?;
    let spec = args.link;
    let rate = spec.rate_bits_per_s.map_or("unlimited rate".into(), |r| {
        format!("{} mbit/s", r as f64 / 1e6)
    });
    println!(
        "link {} -> {} emulating {spec}: {} ms one-way delay (RTT {} ms) and {rate}, \
         each direction; Ctrl-C stops",
        link.local_addr(),
        args.upstream,
        spec.delay_ms,
        2 * spec.delay_ms,
    );
    wait_for_ctrl_c()?;
    println!(
        "link stopped: {} connections, {} bytes up, {} bytes down",
        link.connections(),
        link.bytes_up(),
        link.bytes_down()
    );
    Ok(())
}
