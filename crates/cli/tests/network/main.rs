//! Network training with real processes on loopback: a coordinator and workers as a
//! user starts them, with workers and the coordinator killed mid-run, and hostile
//! uploads sent by hand.

mod harness;
mod hostile;
mod ops;
mod tls;
mod training;
mod trust;
