//! A push decoder for the `text/event-stream` format of inference servers: bytes in, the
//! `data` of each complete event out.
//!
//! Written here rather than taken from a crate because the decoder must see every byte as it
//! arrives (the idle timeout is about bytes, keep-alive comments included, not about parsed
//! events), must accept what the format allows (a leading byte-order mark, `\r`, `\r\n` or
//! `\n` line ends, chunk boundaries anywhere, inside a UTF-8 character too), and must never
//! panic on what a server sends. Only `data` matters to an OpenAI-style stream; `event`, `id`
//! and `retry` fields and comments are read and dropped.

const BOM: &[u8] = "\u{feff}".as_bytes();

/// Decodes an event stream fed in arbitrary pieces.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the line being received (no line end yet).
    line: Vec<u8>,
    /// The previous piece ended in `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    /// The stream's first bytes were checked for a byte-order mark.
    bom_checked: bool,
    /// The `data` lines of the event being received, joined by `\n`.
    data: String,
    /// At least one `data` line was seen for the current event.
    has_data: bool,
}

impl SseDecoder {
    /// Feeds `bytes`; the data of every event they complete is appended to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        if !self.bom_checked {
            // Wait until the stream's first three bytes are known to be a BOM or not.
            self.line.extend_from_slice(bytes);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return;
            }
            self.bom_checked = true;
            let pending = std::mem::take(&mut self.line);
            let pending = pending.strip_prefix(BOM).unwrap_or(&pending);
            self.push_lines(pending, out);
            return;
        }
        // An empty piece (a stream may yield one) says nothing about the `\n` to come.
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        self.push_lines(bytes, out);
    }

    /// Ends the stream: an event without its closing blank line is dropped, as the format
    /// says (a stream cut mid-event must not yield half a chunk).
    pub fn finish(&mut self) {
        self.line.clear();
        self.data.clear();
        self.has_data = false;
    }

    fn push_lines(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = bytes.split_at(end);
            let line_end_len = match rest {
                [b'\r', b'\n', ..] => 2,
                [b'\r'] => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            if self.line.is_empty() {
                self.take_line(head, out);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.take_line(&line, out);
            }
            bytes = &rest[line_end_len..];
        }
        self.line.extend_from_slice(bytes);
    }

    fn take_line(&mut self, line: &[u8], out: &mut Vec<String>) {
        if line.is_empty() {
            if self.has_data {
                out.push(std::mem::take(&mut self.data));
                self.has_data = false;
            }
            return;
        }
        if line[0] == b':' {
            return; // a comment, such as a keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            // A whole line never splits a character; invalid bytes become U+FFFD.
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in(pieces: &[&[u8]]) -> Vec<String> {
        let mut decoder = SseDecoder::default();
        let mut out = Vec::new();
        for piece in pieces {
            decoder.push(piece, &mut out);
        }
        decoder.finish();
        out
    }

    #[test]
    fn fields_comments_and_line_ends() {
        let stream =
            b"data: a\n\n: keep-alive\n\nevent: x\r\ndata:b\r\ndata:  c\r\n\r\nid: 7\rdata: d\r\r";
        assert_eq!(decode_in(&[stream]), vec!["a", "b\n c", "d"]);
    }

    #[test]
    fn a_byte_order_mark_is_skipped_even_when_split() {
        let stream = "\u{feff}data: x\n\n".as_bytes();
        assert_eq!(decode_in(&[stream]), vec!["x"]);
        assert_eq!(
            decode_in(&[&stream[..1], &stream[1..2], &stream[2..]]),
            vec!["x"]
        );
        // Not a BOM after all: the bytes are kept.
        assert_eq!(decode_in(&[b"da", b"ta: y\n\n"]), vec!["y"]);
        // A BOM later in the stream is data.
        assert_eq!(
            decode_in(&["data: \u{feff}z\n\n".as_bytes()]),
            vec!["\u{feff}z"]
        );
    }

    #[test]
    fn a_crlf_split_between_pieces_is_one_line_end() {
        assert_eq!(
            decode_in(&[b"data: a\r", b"\n\r", b"\ndata: b\n\n"]),
            vec!["a", "b"]
        );
        // An empty piece in between changes nothing (found by the property test).
        assert_eq!(
            decode_in(&[b"data: a\r", b"", b"\ndata: b\r\n\r\n"]),
            vec!["a\nb"]
        );
    }

    #[test]
    fn an_unterminated_event_is_dropped_and_bad_utf8_is_replaced() {
        assert_eq!(decode_in(&[b"data: a\n\ndata: b"]), vec!["a"]);
        assert_eq!(decode_in(&[b"data: \xff\n\n"]), vec!["\u{fffd}"]);
        assert!(decode_in(&[b"", b"\n\n\n"]).is_empty());
    }
}
