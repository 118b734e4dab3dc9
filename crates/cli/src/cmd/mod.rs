//! One module per subcommand.
pub mod bench;
pub mod bench_inference;
pub mod bench_layers;
pub mod bench_load;
pub mod bench_network;
pub mod boundaries;
pub mod coordinator;
pub mod demo;
pub mod doctor;
pub mod eval;
pub mod gateway;
pub mod generate;
pub mod ledger;
pub mod link;
pub mod serve;
pub mod train;
pub mod worker;
