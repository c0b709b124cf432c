//! stompd: a thread-per-core STOMP 1.0/1.1/1.2 message broker.
//!
//! The library holds the parts that know no sockets, so they can be tested deterministically:
//! [`codec`] turns bytes into frames and back. The `stompd` binary drives them.

pub mod codec;
pub mod server;
