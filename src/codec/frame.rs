//! The frame a decoder hands out: a command, headers and a body, all borrowed from the bytes
//! that arrived, so that parsing a frame copies nothing unless a header needs unescaping.

use std::borrow::Cow;
use std::fmt;

use smallvec::SmallVec;

/// How many headers a frame keeps inline before the list spills to the heap. Twelve covers
/// every frame the spec shows and what common clients send (a SEND from stomp.py carries five).
pub const HEADERS_INLINE: usize = 12;

/// A STOMP protocol version. Ordered, so that negotiation can pick the highest common one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    /// The value this version has in `accept-version` and `version` headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// Parses one entry of an `accept-version` list; unknown versions are `None`.
    pub fn parse(text: &[u8]) -> Option<Version> {
        match text {
            b"1.0" => Some(Version::V1_0),
            b"1.1" => Some(Version::V1_1),
            b"1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every command of STOMP 1.0–1.2, client and server side. Commands are case-sensitive
/// (STOMP 1.2 "STOMP Frames": "All commands and header names … are case sensitive").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Connected,
    Message,
    Receipt,
    Error,
}

impl Command {
    pub const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
        Command::Connected,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Command::Connect => b"CONNECT",
            Command::Stomp => b"STOMP",
            Command::Send => b"SEND",
            Command::Subscribe => b"SUBSCRIBE",
            Command::Unsubscribe => b"UNSUBSCRIBE",
            Command::Ack => b"ACK",
            Command::Nack => b"NACK",
            Command::Begin => b"BEGIN",
            Command::Commit => b"COMMIT",
            Command::Abort => b"ABORT",
            Command::Disconnect => b"DISCONNECT",
            Command::Connected => b"CONNECTED",
            Command::Message => b"MESSAGE",
            Command::Receipt => b"RECEIPT",
            Command::Error => b"ERROR",
        }
    }

    pub fn parse(text: &[u8]) -> Option<Command> {
        Some(match text {
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"SEND" => Command::Send,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"DISCONNECT" => Command::Disconnect,
            b"CONNECTED" => Command::Connected,
            b"MESSAGE" => Command::Message,
            b"RECEIPT" => Command::Receipt,
            b"ERROR" => Command::Error,
            _ => return None,
        })
    }

    /// CONNECT, STOMP and CONNECTED never escape their headers, so that 1.0 peers can read
    /// them before a version is agreed (STOMP 1.2 "Value Encoding").
    pub fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }

    /// Only SEND, MESSAGE and ERROR may carry a body (STOMP 1.2 "Body").
    pub fn may_have_body(self) -> bool {
        matches!(self, Command::Send | Command::Message | Command::Error)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every command name is ASCII.
        f.write_str(std::str::from_utf8(self.as_bytes()).unwrap_or("?"))
    }
}

/// One `name:value` header. Both sides borrow from the input unless they held escapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: Cow<'a, [u8]>,
    pub value: Cow<'a, [u8]>,
}

impl<'a> Header<'a> {
    pub fn new(name: &'a [u8], value: &'a [u8]) -> Header<'a> {
        Header {
            name: Cow::Borrowed(name),
            value: Cow::Borrowed(value),
        }
    }

    /// Copies the header out of the input so it can outlive the receive buffer.
    pub fn into_owned(self) -> Header<'static> {
        Header {
            name: Cow::Owned(self.name.into_owned()),
            value: Cow::Owned(self.value.into_owned()),
        }
    }
}

pub type Headers<'a> = SmallVec<[Header<'a>; HEADERS_INLINE]>;

/// A decoded (or to-be-encoded) STOMP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub command: Command,
    /// In arrival order, repeats kept: the first of a name is the one that counts
    /// (STOMP 1.2 "Repeated Header Entries"), later ones are history a relay may forward.
    pub headers: Headers<'a>,
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    pub fn new(command: Command) -> Frame<'a> {
        Frame {
            command,
            headers: SmallVec::new(),
            body: &[],
        }
    }

    /// Builder-style header append, for tests and clients.
    pub fn with_header(mut self, name: &'a [u8], value: &'a [u8]) -> Frame<'a> {
        self.headers.push(Header::new(name, value));
        self
    }

    pub fn with_body(mut self, body: &'a [u8]) -> Frame<'a> {
        self.body = body;
        self
    }

    /// The value of the first header called `name`, if any.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|header| header.name.as_ref() == name)
            .map(|header| header.value.as_ref())
    }

    /// The first header called `name` as UTF-8 text; `None` when absent or not UTF-8.
    pub fn header_str(&self, name: &[u8]) -> Option<&str> {
        self.header(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }
}
