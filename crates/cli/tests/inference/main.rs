//! Inference across hosts with real processes on loopback: block servers started as a
//! user starts them, a request crossing them once, replicas stalled and killed, and
//! hostile frames sent by hand, the OpenAI-compatible gateway, and routes built from a
//! coordinator's registry.

mod ar_failover;
mod ar_logprobs;
mod faults;
mod gateway;
mod gateway_api;
mod gateway_logprobs;
mod harness;
mod registry;
mod traversal;
