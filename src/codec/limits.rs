//! Bounds on what one frame may make the decoder buffer. STOMP 1.2 "Size Limits" lets a server
//! cap the header count, the header line length and the body size; we cap the whole frame too,
//! because a connection's reassembly buffer is sized from it.

/// Limits the decoder enforces before it asks for more input. Every field is a maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The whole frame: command, headers, body and the NUL. By default the largest body plus
    /// [`Limits::FRAME_HEADER_ROOM_BYTES`], so a SEND whose body is exactly `body_bytes_max`
    /// fits with its headers.
    pub frame_bytes_max: usize,
    /// Headers in one frame. 1,000 is far beyond any real client (stomp.py sends five on a
    /// SEND) yet keeps a hostile header flood to a few tens of KiB of bookkeeping.
    pub headers_count_max: usize,
    /// One header line (or the command line), EOL included. 8 KiB, like common HTTP servers:
    /// long enough for JWT passcodes and selectors, short enough to bound a stalled line.
    pub header_line_bytes_max: usize,
    /// The body alone. 16 MiB by default, above RabbitMQ's 4 MiB frame limit and below
    /// ActiveMQ's 100 MiB `maxDataLength`: a broker that keeps every message in a log should not
    /// accept single messages of hundreds of MiB by default.
    pub body_bytes_max: usize,
}

impl Limits {
    /// What the default frame limit allows beyond the largest body: the command line and the
    /// headers. 64 KiB: a real client's SEND carries a few hundred bytes of headers (stomp.py's
    /// five are under 200), and eight header lines at the 8 KiB line limit still fit, while a
    /// connection's worst-case reassembly grows by only 64 KiB.
    pub const FRAME_HEADER_ROOM_BYTES: usize = 64 * 1024;

    pub const DEFAULT: Limits = Limits {
        frame_bytes_max: 16 * 1024 * 1024 + Limits::FRAME_HEADER_ROOM_BYTES,
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
