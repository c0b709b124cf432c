//! stompd-loadgen: load for any STOMP broker, and the numbers that say how it coped.
//!
//! [`client`] (the broker crate's `stompd::client`) is a small blocking STOMP client on the
//! broker's own codec; [`workload`] runs
//! the queue, topic, latency, ping-pong, backlog and connection workloads on it; [`tracker`]
//! decides from the stamps in message bodies ([`payload`]) whether anything was lost,
//! duplicated or reordered; [`report`] prints the result, and [`summary`] turns many results
//! into the comparison table. [`relay`] is the reference broker
//! the tool is measured against: the simplest in-memory forwarder.

/// The blocking client lives in the broker crate, shared with `stompd-log replay`; re-exported
/// so `stompd_loadgen::client` paths keep working.
pub use stompd::client;
pub mod interrupt;
pub mod payload;
pub mod relay;
pub mod report;
pub mod stats;
pub mod summary;
pub mod tracker;
pub mod workload;
