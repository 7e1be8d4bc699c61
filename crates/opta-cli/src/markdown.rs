//! Markdown answers for terminals, rendered as they stream: the line being received is shown
//! plain as its tokens arrive; once it ends it is redrawn styled (headings, emphasis, inline
//! code, lists, quotes, rules; fenced code blocks with syntax colour from `syntect`). Inline
//! spans are parsed by `pulldown-cmark`. Only whole lines are redrawn, so nothing flickers
//! but the line in progress. Off a terminal (or `--plain`, `NO_COLOR`) text passes unchanged.
//!
//! The text fed in has already been through [`crate::sanitize`]: the only control characters
//! in the output are the ones written here.

use std::sync::OnceLock;

use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use syntect::easy::HighlightLines;
use syntect::highlighting::{Theme, ThemeSet};
use syntect::parsing::SyntaxSet;

const BOLD: (&str, &str) = ("\x1b[1m", "\x1b[22m");
const DIM: (&str, &str) = ("\x1b[2m", "\x1b[22m");
const ITALIC: (&str, &str) = ("\x1b[3m", "\x1b[23m");
const UNDERLINE: (&str, &str) = ("\x1b[4m", "\x1b[24m");
const CODE: (&str, &str) = ("\x1b[36m", "\x1b[39m");
const RESET: &str = "\x1b[0m";

/// Renders one answer as it streams.
pub struct MarkdownStream {
    styled: bool,
    columns: usize,
    /// The line being received.
    partial: String,
    /// Whether `partial` was printed (plain) and must be erased before its styled form.
    partial_printed: bool,
    /// Inside a fenced code block: its highlighter.
    code: Option<CodeBlock>,
}

struct CodeBlock {
    highlighter: Option<HighlightLines<'static>>,
}

impl MarkdownStream {
    /// For stdout: styled when it is a terminal with colour on and `plain` was not asked for.
    pub fn for_stdout(plain: bool) -> Self {
        use std::io::IsTerminal;
        let styled = !plain && std::io::stdout().is_terminal() && console::colors_enabled();
        let columns = console::Term::stdout().size().1;
        Self::new(styled, usize::from(columns))
    }

    /// `styled`: render for a terminal `columns` wide; otherwise pass text through.
    pub fn new(styled: bool, columns: usize) -> Self {
        Self {
            styled,
            columns: columns.max(1),
            partial: String::new(),
            partial_printed: false,
            code: None,
        }
    }

    /// What to write for `text` arriving.
    pub fn push(&mut self, text: &str) -> String {
        if !self.styled {
            return text.to_owned();
        }
        let mut out = String::new();
        for piece in text.split_inclusive('\n') {
            match piece.strip_suffix('\n') {
                Some(end) => {
                    self.partial.push_str(end);
                    out.push_str(&self.erase_partial());
                    let line = std::mem::take(&mut self.partial);
                    out.push_str(&self.render_line(&line));
                    out.push('\n');
                }
                None => {
                    self.partial.push_str(piece);
                    self.partial_printed = true;
                    out.push_str(piece);
                }
            }
        }
        out
    }

    /// What to write when the answer ended: the last line, styled. Afterwards the stream is
    /// ready for the next answer (a code block this one left open is closed).
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if self.styled && !self.partial.is_empty() {
            out = self.erase_partial();
            let line = std::mem::take(&mut self.partial);
            out.push_str(&self.render_line(&line));
        }
        self.partial.clear();
        self.partial_printed = false;
        self.code = None;
        out
    }

    /// Moves back to where the plain partial line began and clears from there.
    fn erase_partial(&mut self) -> String {
        if !std::mem::take(&mut self.partial_printed) {
            return String::new();
        }
        let width = console::measure_text_width(&self.partial);
        let rows_up = width.saturating_sub(1) / self.columns;
        let mut out = String::from("\r");
        if rows_up > 0 {
            out.push_str(&format!("\x1b[{rows_up}A"));
        }
        out.push_str("\x1b[J");
        out
    }

    /// One whole line, styled.
    fn render_line(&mut self, line: &str) -> String {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            self.code = match self.code.take() {
                Some(_) => None,
                None => Some(CodeBlock::new(trimmed[3..].trim())),
            };
            return wrap(DIM, line);
        }
        if let Some(code) = &mut self.code {
            return code.highlight(line);
        }
        let indent = &line[..line.len() - trimmed.len()];
        if let Some((level, title)) = heading(trimmed) {
            let title = inline(title);
            return if level == 1 {
                format!("{}{}{title}{}{}", BOLD.0, UNDERLINE.0, UNDERLINE.1, BOLD.1)
            } else {
                wrap(BOLD, &title)
            };
        }
        if is_rule(trimmed) {
            return wrap(DIM, &"─".repeat(self.columns.min(40)));
        }
        if let Some(rest) = trimmed
            .strip_prefix("> ")
            .or(trimmed.strip_prefix('>').filter(|r| r.is_empty()))
        {
            return format!(
                "{indent}{}│{} {}",
                DIM.0,
                DIM.1,
                wrap(ITALIC, &inline(rest))
            );
        }
        if let Some(rest) = ["- ", "* ", "+ "]
            .iter()
            .find_map(|bullet| trimmed.strip_prefix(bullet))
        {
            return format!("{indent}• {}", inline(rest));
        }
        format!("{indent}{}", inline(trimmed))
    }
}

impl CodeBlock {
    fn new(language: &str) -> Self {
        let (syntaxes, theme) = highlighting();
        let syntax = syntaxes
            .find_syntax_by_token(language)
            .filter(|_| !language.is_empty());
        Self {
            highlighter: syntax.map(|s| HighlightLines::new(s, theme)),
        }
    }

    fn highlight(&mut self, line: &str) -> String {
        let (syntaxes, _) = highlighting();
        let ranges = self
            .highlighter
            .as_mut()
            .and_then(|h| h.highlight_line(line, syntaxes).ok());
        match ranges {
            Some(ranges) => {
                let mut out = syntect::util::as_24_bit_terminal_escaped(&ranges, false);
                out.push_str(RESET);
                out
            }
            // An unknown language: one colour for the whole block.
            None => wrap(CODE, line),
        }
    }
}

/// The syntaxes and a theme, loaded once, when the first code block shows up.
fn highlighting() -> &'static (SyntaxSet, Theme) {
    static LOADED: OnceLock<(SyntaxSet, Theme)> = OnceLock::new();
    LOADED.get_or_init(|| {
        let syntaxes = SyntaxSet::load_defaults_nonewlines();
        let theme = ThemeSet::load_defaults()
            .themes
            .remove("base16-ocean.dark")
            .unwrap_or_default();
        (syntaxes, theme)
    })
}

fn wrap(style: (&str, &str), text: &str) -> String {
    format!("{}{text}{}", style.0, style.1)
}

/// `## Title` → `(2, "Title")`.
fn heading(line: &str) -> Option<(usize, &str)> {
    let level = line.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    line[level..]
        .strip_prefix(' ')
        .map(|title| (level, title.trim_end_matches(['#', ' '])))
}

fn is_rule(line: &str) -> bool {
    let line = line.trim_end();
    line.len() >= 3
        && ['-', '*', '_']
            .iter()
            .any(|c| line.chars().all(|x| x == *c))
}

/// Emphasis, strong, inline code and links of one line.
fn inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for event in Parser::new(text) {
        match event {
            Event::Text(t) => out.push_str(&t),
            Event::Code(c) => out.push_str(&wrap(CODE, &c)),
            Event::Start(Tag::Strong) => out.push_str(BOLD.0),
            Event::End(TagEnd::Strong) => out.push_str(BOLD.1),
            Event::Start(Tag::Emphasis) => out.push_str(ITALIC.0),
            Event::End(TagEnd::Emphasis) => out.push_str(ITALIC.1),
            Event::Start(Tag::Link { .. }) => out.push_str(UNDERLINE.0),
            Event::End(TagEnd::Link) => out.push_str(UNDERLINE.1),
            Event::SoftBreak | Event::HardBreak => out.push(' '),
            Event::Html(h) | Event::InlineHtml(h) => out.push_str(&h),
            // A line that parses as a block of its own (`1. x`, `| a |`): its text as given.
            Event::Start(Tag::List(Some(first))) => out.push_str(&format!("{first}. ")),
            _ => {}
        }
    }
    // A line pulldown-cmark reads as nothing (say, `   `): keep it.
    if out.is_empty() { text.to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer as a terminal shows it after every redraw: escapes made visible.
    fn rendered(answer: &str, pieces: usize) -> String {
        let mut md = MarkdownStream::new(true, 80);
        let chars: Vec<char> = answer.chars().collect();
        let size = chars.len().div_ceil(pieces.max(1)).max(1);
        let mut out = String::new();
        for chunk in chars.chunks(size) {
            out.push_str(&md.push(&chunk.iter().collect::<String>()));
        }
        out.push_str(&md.finish());
        out
    }

    const ANSWER: &str = "# Plan\n\nTwo **steps**, one *careful*:\n\n\
        - read `src/main.rs`\n- add a [test](https://example.com)\n\n\
        > note: keep it small\n\n---\n\n```rust\nfn main() {\n    println!(\"hi\");\n}\n```\n\
        1. done\n";

    #[test]
    fn a_recorded_answer_renders_as_expected() {
        insta::assert_snapshot!(rendered(ANSWER, 1).replace('\x1b', "⎋"));
    }

    #[test]
    fn an_answer_that_leaves_a_code_block_open_does_not_colour_the_next() {
        let mut md = MarkdownStream::new(true, 80);
        md.push("```\ncode\n");
        md.finish();
        assert_eq!(md.push("**next** answer\n"), "\x1b[1mnext\x1b[22m answer\n");
    }

    #[test]
    fn plain_output_is_the_text_itself() {
        let mut md = MarkdownStream::new(false, 80);
        assert_eq!(md.push(ANSWER), ANSWER);
        assert_eq!(md.finish(), "");
    }

    #[test]
    fn streamed_in_pieces_each_line_ends_styled_the_same() {
        // Whatever the chunking, the text after the last redraw of each line is the same.
        let whole = rendered(ANSWER, 1);
        let last_forms = |s: &str| -> Vec<String> {
            s.split('\n')
                .map(|l| l.rsplit("\x1b[J").next().unwrap_or(l).to_owned())
                .collect()
        };
        for pieces in [2, 7, 40, ANSWER.len()] {
            assert_eq!(
                last_forms(&rendered(ANSWER, pieces)),
                last_forms(&whole),
                "{pieces}"
            );
        }
    }

    #[test]
    fn a_long_partial_line_is_erased_across_its_wrapped_rows() {
        let mut md = MarkdownStream::new(true, 10);
        let partial = md.push("abcdefghijklmnopqrstuvwxy");
        assert_eq!(partial, "abcdefghijklmnopqrstuvwxy");
        let done = md.push("z\n");
        assert!(done.starts_with("\r\x1b[2A\x1b[J"), "{done:?}");
    }
}
