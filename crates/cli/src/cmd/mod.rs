//! One module per subcommand.
pub mod bench;
pub mod bench_network;
pub mod boundaries;
pub mod coordinator;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod link;
pub mod train;
pub mod worker;
