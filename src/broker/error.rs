//! Why a connection is being closed, and the one place that turns that into an ERROR frame.
//!
//! STOMP 1.2 "ERROR": the server sends ERROR with a short `message` header, a `receipt-id` when
//! the offending frame asked for a receipt, and a body with detail, then closes the connection.

use thiserror::Error;

use crate::codec::{Command, DecodeError, FrameWriter, Version};

/// Everything a client can do wrong, or that makes the broker give up on its connection.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("expected CONNECT or STOMP, got {0}")]
    NotConnected(Command),
    #[error("already connected")]
    AlreadyConnected,
    #[error("no common protocol version")]
    NoCommonVersion,
    #[error("login failed")]
    LoginFailed,
    #[error("server busy, too many logins already wait for verification; retry later")]
    LoginQueueFull,
    #[error("connect timeout, no complete CONNECT frame within {0} ms of connecting")]
    ConnectTimeout(u64),
    #[error("{0} sent before CONNECTED (login still being checked)")]
    LoginPending(Command),
    #[error("{0} is a server frame")]
    ServerFrame(Command),
    #[error("{command} frame requires a '{header}' header")]
    MissingHeader {
        command: Command,
        header: &'static str,
    },
    #[error("invalid '{header}' header: {detail}")]
    InvalidHeader {
        header: &'static str,
        detail: &'static str,
    },
    #[error("subscription id already in use")]
    DuplicateSubscription,
    #[error("unknown subscription")]
    UnknownSubscription,
    #[error("unknown ack id")]
    UnknownAck,
    #[error("transaction already begun")]
    DuplicateTransaction,
    #[error("unknown transaction")]
    UnknownTransaction,
    #[error("{limit} exceeded (at most {max})")]
    LimitExceeded { limit: &'static str, max: u64 },
    #[error("queue full ({limit} reached)")]
    QueueFull { limit: &'static str },
    #[error("message not stored: {reason}")]
    NotStored { reason: &'static str },
    #[error("/queue/monitor is read-only")]
    MonitorReadOnly,
    #[error("heart-beat timeout")]
    HeartbeatTimeout,
    #[error("server shutting down")]
    ShuttingDown,
}

/// The versions this broker speaks, as the ERROR for a failed negotiation lists them.
pub const SUPPORTED_VERSIONS: &str = "1.0,1.1,1.2";

/// Appends the ERROR frame for `error` to `out`. The only place an ERROR is built.
pub fn write_error_frame(
    out: &mut Vec<u8>,
    version: Version,
    error: &ProtocolError,
    receipt_id: Option<&[u8]>,
) {
    let message = error.to_string();
    let body = match error {
        ProtocolError::NoCommonVersion => {
            format!(
                "Supported protocol versions are {}\n",
                SUPPORTED_VERSIONS.replace(',', " ")
            )
        }
        _ => format!("{message}\n"),
    };
    let mut writer = FrameWriter::begin(out, version, Command::Error);
    if *error == ProtocolError::NoCommonVersion {
        writer.header(b"version", SUPPORTED_VERSIONS.as_bytes());
    }
    writer.header(b"message", message.as_bytes());
    if let Some(receipt_id) = receipt_id {
        writer.header(b"receipt-id", receipt_id);
    }
    writer
        .header(b"content-type", b"text/plain")
        .content_length(body.len());
    writer.finish(body.as_bytes());
}
