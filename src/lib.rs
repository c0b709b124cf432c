//! stompd: a thread-per-core STOMP 1.0/1.1/1.2 message broker.
//!
//! The library holds the parts that know no sockets, so they can be tested deterministically:
//! [`codec`] turns bytes into frames and back; [`broker`] is the sessions and destinations;
//! [`log`] stores durable queues; [`config`] and [`auth`] are what the operator sets. The
//! `stompd` binary drives them through [`server`], the per-core io_uring event loops. [`client`], the one part with a socket, is a small blocking
//! STOMP client for the tools around the broker (the load generator, `stompd-log replay`); the
//! broker itself never uses it.

pub mod auth;
pub mod broker;
pub mod client;
pub mod codec;
pub mod config;
pub mod log;
pub mod run;
pub mod server;
