//! Bounds on what one frame may make the decoder buffer. STOMP 1.2 "Size Limits" lets a server
//! cap the header count, the header line length and the body size; we cap the whole frame too,
//! because a connection's reassembly buffer is sized from it.

/// Limits the decoder enforces before it asks for more input. Every field is a maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The whole frame: command, headers, body and the NUL. 16 MiB by default, above RabbitMQ's
    /// 4 MiB frame limit and below ActiveMQ's 100 MiB `maxDataLength`: a broker that keeps every
    /// message in a log should not accept single messages of hundreds of MiB by default.
    pub frame_bytes_max: usize,
    /// Headers in one frame. 1,000 is far beyond any real client (stomp.py sends five on a
    /// SEND) yet keeps a hostile header flood to a few tens of KiB of bookkeeping.
    pub headers_count_max: usize,
    /// One header line (or the command line), EOL included. 8 KiB, like common HTTP servers:
    /// long enough for JWT passcodes and selectors, short enough to bound a stalled line.
    pub header_line_bytes_max: usize,
    /// The body alone. Equal to the frame bound by default; configured separately so an
    /// operator can allow large headers or large bodies independently.
    pub body_bytes_max: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        frame_bytes_max: 16 * 1024 * 1024,
        headers_count_max: 1000,
        header_line_bytes_max: 8 * 1024,
        body_bytes_max: 16 * 1024 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}
