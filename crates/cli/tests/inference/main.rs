//! Inference across hosts with real processes on loopback: block servers started as a
//! user starts them, a request crossing them once, replicas stalled and killed, and
//! hostile frames sent by hand, and the OpenAI-compatible gateway.

mod faults;
mod gateway;
mod gateway_api;
mod harness;
mod traversal;
