//! How bytes from the log are shown: text that cannot fake a line or a terminal escape, and
//! JSON that keeps every byte.

use serde_json::{json, Value};

use crate::cli::BodyMode;

/// How many body bytes a preview shows: a line's worth.
pub const PREVIEW_BYTES: usize = 64;

/// Bytes as one line of text: lossy UTF-8 with control characters escaped, so a newline or an
/// ANSI escape in a header value cannot fake another line or recolour the terminal.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// The body as the text listing shows it.
pub fn body_text(body: &[u8], mode: BodyMode) -> String {
    match mode {
        BodyMode::None => format!("{} bytes", body.len()),
        BodyMode::Full => format!("{} bytes: \"{}\"", body.len(), text(body)),
        BodyMode::Preview if body.len() <= PREVIEW_BYTES => {
            format!("{} bytes: \"{}\"", body.len(), text(body))
        }
        BodyMode::Preview => {
            let cut = preview_cut(body);
            format!(
                "{} bytes: \"{}\"... ({} more bytes)",
                body.len(),
                text(&body[..cut]),
                body.len() - cut
            )
        }
    }
}

/// Where a preview ends: at most [`PREVIEW_BYTES`], not inside a UTF-8 character.
fn preview_cut(body: &[u8]) -> usize {
    let mut cut = PREVIEW_BYTES.min(body.len());
    while cut > 0 && cut < body.len() && (body[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    cut
}

/// A byte string for JSON: a string when it is UTF-8 (the usual case), else lossy. Use
/// [`insert_body`] for bodies, which keeps every byte.
pub fn json_text(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

/// Adds the body fields to a JSON record: `body_bytes` always; `body` (UTF-8) or `body_hex`
/// (anything else) for the whole body or its preview, and `body_truncated` for a preview.
pub fn insert_body(object: &mut serde_json::Map<String, Value>, body: &[u8], mode: BodyMode) {
    object.insert("body_bytes".into(), json!(body.len()));
    let shown = match mode {
        BodyMode::None => return,
        BodyMode::Full => body,
        BodyMode::Preview => {
            let shown = &body[..preview_cut(body)];
            object.insert("body_truncated".into(), json!(shown.len() < body.len()));
            shown
        }
    };
    match std::str::from_utf8(shown) {
        Ok(text) => object.insert("body".into(), json!(text)),
        Err(_) => object.insert("body_hex".into(), json!(hex(shown))),
    };
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cannot_fake_a_line_or_an_escape() {
        assert_eq!(text(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }

    #[test]
    fn previews_are_cut_on_a_character_boundary() {
        let body = "é".repeat(40); // 80 bytes of two-byte characters
        let shown = body_text(body.as_bytes(), BodyMode::Preview);
        assert!(shown.starts_with("80 bytes: \""), "{shown}");
        assert!(shown.ends_with("... (16 more bytes)"), "{shown}");
        assert!(!shown.contains('\u{FFFD}'));
        assert_eq!(body_text(b"hi", BodyMode::Preview), "2 bytes: \"hi\"");
        assert_eq!(body_text(b"hi", BodyMode::None), "2 bytes");
    }

    #[test]
    fn json_bodies_keep_every_byte() {
        let mut object = serde_json::Map::new();
        insert_body(&mut object, &[0xff, 0x00, 0x41], BodyMode::Full);
        assert_eq!(object["body_hex"], "ff0041");
        assert_eq!(object["body_bytes"], 3);
        let mut object = serde_json::Map::new();
        insert_body(&mut object, &[b'x'; 100], BodyMode::Preview);
        assert_eq!(object["body_truncated"], true);
        assert_eq!(object["body"].as_str().unwrap().len(), PREVIEW_BYTES);
    }
}
