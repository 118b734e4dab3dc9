//! One module per subcommand.
pub mod bench;
pub mod boundaries;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod train;
