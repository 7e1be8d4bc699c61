//! The one gate between strings that came over the wire (titles, model names, message text,
//! tokens, tool arguments, error messages: anything another client, a model or a server
//! wrote) and the terminal. Control characters would let them drive the terminal: retitle
//! it, clear it, move the cursor, or forge a table row with an embedded newline. They are
//! shown escaped instead (`\x1b`, `\n`, `\u{202e}`), visible and harmless.

use std::borrow::Cow;
use std::fmt::Write;

/// For one-line fields (a title, a model, a table cell, a tool line): every control
/// character is escaped, newlines and tabs too.
pub fn line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// For multi-line text (a message, streamed tokens, an error): newlines and tabs stay,
/// every other control character is escaped (a carriage return too: it would let text
/// overwrite the line before it).
pub fn text(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

fn escape(input: &str, keep_layout: bool) -> Cow<'_, str> {
    let unsafe_char = |c: char| needs_escape(c) && !(keep_layout && matches!(c, '\n' | '\t'));
    if !input.chars().any(unsafe_char) {
        return Cow::Borrowed(input);
    }
    let mut out = String::with_capacity(input.len() + 16);
    for c in input.chars() {
        if !unsafe_char(c) {
            out.push(c);
            continue;
        }
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\t' => out.write_str("\\t"),
            '\r' => out.write_str("\\r"),
            c if (c as u32) < 0x100 => write!(out, "\\x{:02x}", c as u32),
            c => write!(out, "\\u{{{:x}}}", c as u32),
        };
    }
    Cow::Owned(out)
}

/// C0 and C1 controls, DEL, and the bidirectional overrides and isolates (which reorder what
/// a person reads: "Trojan Source").
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_forged_rows_are_shown_not_obeyed() {
        let evil = "evil \u{1b}]0;pwned\u{7} \u{1b}[2J\nforged row\r\u{9b}31m\u{7f}";
        assert_eq!(
            line(evil),
            "evil \\x1b]0;pwned\\x07 \\x1b[2J\\nforged row\\r\\x9b31m\\x7f"
        );
        assert_eq!(
            text(evil),
            "evil \\x1b]0;pwned\\x07 \\x1b[2J\nforged row\\r\\x9b31m\\x7f"
        );
        assert_eq!(line("a\u{202e}b\u{2066}"), "a\\u{202e}b\\u{2066}");
    }

    #[test]
    fn ordinary_text_is_borrowed_unchanged() {
        for s in ["plain", "héllo wörld ✓ → 日本語", ""] {
            assert!(matches!(line(s), Cow::Borrowed(_)));
        }
        assert!(matches!(text("two\nlines\tand a tab"), Cow::Borrowed(_)));
        assert_eq!(line("a\tb"), "a\\tb");
    }

    #[test]
    fn nothing_a_terminal_obeys_survives() {
        // Every char up to U+00FF plus the bidi controls: none of them comes out raw.
        let all: String = (0u32..0x100)
            .chain(0x2000..0x2070)
            .filter_map(char::from_u32)
            .collect();
        for out in [line(&all), text(&all)] {
            assert!(
                !out.chars()
                    .any(|c| needs_escape(c) && !matches!(c, '\n' | '\t')),
                "{out:?}"
            );
        }
        assert!(!line(&all).contains(['\n', '\t']));
    }
}
