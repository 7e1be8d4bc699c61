//! `read_file`'s reader: it streams the file and stops at its limits, so what one call holds
//! in memory is bounded by what it returns, whatever the file's size or its lines' lengths.
//! Lines past the window are only counted (up to a scan limit), never kept.

use std::fmt::Write as _;
use std::io::{self, BufRead, Read, Seek, SeekFrom};

/// What one read may return and scan.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Lines shown at most.
    pub lines: usize,
    /// Bytes of output at most (notes aside).
    pub out_bytes: usize,
    /// Bytes of one line shown at most; a longer line is cut with the byte offset to go on
    /// from.
    pub line_bytes: usize,
    /// Bytes scanned at most (to count the lines past the window).
    pub scan_bytes: u64,
}

/// The window of numbered lines from line `first` (counting from 1), with notes on what was
/// left out and how to read on.
pub fn numbered(mut reader: impl BufRead, first: usize, limits: Limits) -> io::Result<String> {
    let first = first.max(1);
    let mut window = Window {
        first,
        limits,
        out: String::new(),
        shown: 0,
        done: false,
        next_unshown: None,
        cut: None,
    };
    let mut line_no = 1usize;
    let mut line_start = 0u64;
    let mut line_len = 0u64;
    // The start of the current line, kept only while it is in the window (bounded).
    let mut current: Vec<u8> = Vec::new();
    let mut at = 0u64;
    let mut scanned_all = true;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        if at >= limits.scan_bytes {
            scanned_all = false;
            break;
        }
        let room = usize::try_from(limits.scan_bytes - at).unwrap_or(usize::MAX);
        let n = buf.len().min(room);
        let mut i = 0;
        while i < n {
            let rest = &buf[i..n];
            let (segment, ends_line) = match rest.iter().position(|b| *b == b'\n') {
                Some(p) => (&rest[..p], true),
                None => (rest, false),
            };
            if window.wants(line_no) {
                let keep = (limits.line_bytes + 4).saturating_sub(current.len());
                current.extend_from_slice(&segment[..segment.len().min(keep)]);
            }
            line_len += segment.len() as u64;
            i += segment.len() + usize::from(ends_line);
            if ends_line {
                window.line(line_no, line_start, line_len, &current)?;
                current.clear();
                line_no += 1;
                line_start = at + i as u64;
                line_len = 0;
            }
        }
        at += n as u64;
        reader.consume(n);
    }
    // A last line without a line end.
    if line_len > 0 {
        window.line(line_no, line_start, line_len, &current)?;
        line_no += 1;
    }
    let total = line_no - 1;
    let mut out = window.out;
    if let Some((line, shown, resume)) = window.cut {
        let _ = writeln!(
            out,
            "[… line {line} is longer than {} KiB: its first {shown} bytes are shown; read on \
             with byteOffset {resume} …]",
            limits.line_bytes / 1024
        );
    } else if total == 0 && scanned_all {
        out.push_str("(empty file)\n");
    } else if first > total && scanned_all {
        let _ = writeln!(
            out,
            "(the file has {total} lines; offset {first} is past its end)"
        );
    } else if let Some(next) = window.next_unshown.filter(|next| *next <= total) {
        let _ = writeln!(
            out,
            "[… lines {next}-{total} not shown: read on with offset {next} …]"
        );
    }
    if !scanned_all {
        let _ = writeln!(
            out,
            "[… only the first {} MiB were scanned (lines counted: {total}); read further \
             with byteOffset …]",
            limits.scan_bytes >> 20
        );
    }
    Ok(out)
}

/// Up to `limits.out_bytes` of text from byte `offset` (for a line too long to show whole),
/// with the offset to go on from when there is more.
pub fn from_byte(mut reader: impl Read + Seek, offset: u64, limits: Limits) -> io::Result<String> {
    reader.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    reader
        .take(limits.out_bytes as u64 + 1)
        .read_to_end(&mut bytes)?;
    let more = bytes.len() > limits.out_bytes;
    bytes.truncate(limits.out_bytes);
    let text = cut_text(&bytes)?;
    let mut out = format!("[from byte {offset}]\n{text}");
    if more {
        let _ = write!(
            out,
            "\n[… read on with byteOffset {} …]\n",
            offset + text.len() as u64
        );
    } else if text.is_empty() {
        out.push_str("(nothing at this offset: it is at or past the end of the file)\n");
    }
    Ok(out)
}

/// The text of `bytes`, a character cut at the end dropped; not UTF-8 otherwise: an error.
fn cut_text(bytes: &[u8]) -> io::Result<&str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) if e.error_len().is_none() => {
            Ok(std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default())
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")),
    }
}

/// The lines being shown.
struct Window {
    first: usize,
    limits: Limits,
    out: String,
    shown: usize,
    done: bool,
    /// The first line past the window, once the window is full.
    next_unshown: Option<usize>,
    /// A line shown cut: `(line, bytes shown, byte offset to go on from)`.
    cut: Option<(usize, usize, u64)>,
}

impl Window {
    fn wants(&self, line: usize) -> bool {
        !self.done && line >= self.first
    }

    /// Line `line` ended; `start` is its byte offset, `len` its length, `kept` its start.
    fn line(&mut self, line: usize, start: u64, len: u64, kept: &[u8]) -> io::Result<()> {
        if !self.wants(line) {
            return Ok(());
        }
        let kept = kept.strip_suffix(b"\r").unwrap_or(kept);
        if len > self.limits.line_bytes as u64 {
            let text = cut_text(&kept[..kept.len().min(self.limits.line_bytes)])?;
            let _ = writeln!(self.out, "{line:>6}\t{text}");
            self.cut = Some((line, text.len(), start + text.len() as u64));
            self.done = true;
            return Ok(());
        }
        let text = cut_text(kept)?;
        if self.out.len() + text.len() > self.limits.out_bytes {
            self.next_unshown = Some(line);
            self.done = true;
            return Ok(());
        }
        let _ = writeln!(self.out, "{line:>6}\t{text}");
        self.shown += 1;
        if self.shown == self.limits.lines {
            self.next_unshown = Some(line + 1);
            self.done = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        lines: 3,
        out_bytes: 1000,
        line_bytes: 100,
        scan_bytes: 1 << 20,
    };

    fn read(text: &str, first: usize, limits: Limits) -> String {
        numbered(io::Cursor::new(text.as_bytes()), first, limits).unwrap()
    }

    #[test]
    fn a_window_of_numbered_lines_says_how_to_read_on() {
        let text = "a\nb\r\nc\nd\ne";
        assert_eq!(
            read(text, 1, LIMITS),
            "     1\ta\n     2\tb\n     3\tc\n[… lines 4-5 not shown: read on with offset 4 …]\n"
        );
        assert_eq!(read(text, 4, LIMITS), "     4\td\n     5\te\n");
        assert_eq!(
            read(text, 9, LIMITS),
            "(the file has 5 lines; offset 9 is past its end)\n"
        );
        assert_eq!(read("", 1, LIMITS), "(empty file)\n");
        assert_eq!(read("x\n", 1, LIMITS), "     1\tx\n");
    }

    #[test]
    fn a_line_longer_than_the_line_limit_is_cut_with_the_offset_to_go_on_from() {
        let long = format!("head\n{}\ntail\n", "é".repeat(80)); // 160 bytes
        let out = read(&long, 2, LIMITS);
        assert!(
            out.starts_with(&format!("     2\t{}\n", "é".repeat(50))),
            "{out}"
        );
        // Line 2 starts at byte 5; 100 bytes of it were shown.
        assert!(out.contains("read on with byteOffset 105"), "{out}");
        let rest = from_byte(io::Cursor::new(long.as_bytes()), 105, LIMITS).unwrap();
        assert_eq!(rest, format!("[from byte 105]\n{}\ntail\n", "é".repeat(30)));
    }

    #[test]
    fn memory_is_bounded_by_the_window_whatever_the_file() {
        // A 4 MiB file of one line: only the line limit's worth is ever kept.
        let huge = "x".repeat(4 << 20);
        let out = read(&huge, 1, LIMITS);
        assert!(out.len() < 400, "{} bytes", out.len());
        assert!(out.contains("byteOffset 100"));
        // Past the scan limit lines are no longer counted, and it says so.
        let small_scan = Limits {
            scan_bytes: 1024,
            ..LIMITS
        };
        let many = "line\n".repeat(10_000);
        let out = read(&many, 1, small_scan);
        assert!(out.contains("only the first 0 MiB were scanned"), "{out}");
        let out = from_byte(io::Cursor::new(huge.as_bytes()), 0, LIMITS).unwrap();
        assert!(
            out.ends_with("[… read on with byteOffset 1000 …]\n"),
            "{out}"
        );
    }

    #[test]
    fn binary_content_in_the_window_is_refused() {
        let err = numbered(io::Cursor::new(b"ok\n\xff\xfe\n".to_vec()), 1, LIMITS).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
