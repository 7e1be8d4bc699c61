//! Terminal presentation: colour (only on terminals, `NO_COLOR` honoured), spinners, tables.

use std::io::IsTerminal;
use std::time::Duration;

use console::style;
use indicatif::{ProgressBar, ProgressStyle};

/// Colour only when the stream is a terminal, `NO_COLOR` is unset and `TERM` is not `dumb`.
pub fn init_colours() {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
        || std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    console::set_colors_enabled(!no_color && std::io::stdout().is_terminal());
    console::set_colors_enabled_stderr(!no_color && std::io::stderr().is_terminal());
}

/// `error:` in red where colour is on.
pub fn error_label() -> String {
    style("error:").red().bold().for_stderr().to_string()
}

/// `line` cut to the terminal's width (by display width, with `…`) so that a tool line stays
/// one line; unchanged when neither stdout nor stderr is a terminal.
pub fn fit(line: &str) -> String {
    let width = console::Term::stdout()
        .size_checked()
        .or_else(|| console::Term::stderr().size_checked())
        .map(|(_rows, cols)| usize::from(cols));
    match width {
        Some(cols) if cols > 1 => console::truncate_str(line, cols - 1, "…").into_owned(),
        _ => line.to_owned(),
    }
}

/// Dimmed text for stdout.
pub fn dim_out(text: &str) -> String {
    style(text).dim().to_string()
}

/// Dimmed text for stderr notes.
pub fn dim(text: &str) -> String {
    style(text).dim().for_stderr().to_string()
}

/// Green text for stderr (a diff's additions).
pub fn green(text: &str) -> String {
    style(text).green().for_stderr().to_string()
}

/// Red text for stderr (a diff's removals).
pub fn red(text: &str) -> String {
    style(text).red().for_stderr().to_string()
}

/// A spinner on stderr with `message`, or nothing when stderr is not a terminal.
pub fn spinner(message: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// An ISO-8601 time as people say it relative to `now`: "just now", "3 min ago", "2 h ago",
/// "5 days ago", or the date for anything older than a month; the text itself if it does
/// not parse.
pub fn ago(iso: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let Ok(then) = chrono::DateTime::parse_from_rfc3339(iso) else {
        return iso.to_owned();
    };
    let seconds = (now - then.with_timezone(&chrono::Utc)).num_seconds();
    match seconds {
        ..=-60 => then.format("%Y-%m-%d %H:%M").to_string(),
        -59..=44 => "just now".into(),
        45..=5_399 => format!("{} min ago", ((seconds + 30) / 60).max(1)),
        5_400..=129_599 => format!("{} h ago", (seconds + 1_800) / 3_600),
        129_600..=2_591_999 => format!("{} days ago", (seconds + 43_200) / 86_400),
        _ => then.format("%Y-%m-%d").to_string(),
    }
}

/// Renders rows as aligned columns under a header; cells are made safe to print (a newline
/// in one cannot forge a row).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|c| crate::sanitize::line(c).into_owned())
                .collect()
        })
        .collect();
    // Columns by display width: a CJK character takes two cells, a combining mark none.
    let width = console::measure_text_width;
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(width(cell));
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(width(c));
                format!("{c}{}", " ".repeat(pad))
            })
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = style(line(header.iter().map(|h| (*h).to_owned()).collect()))
        .bold()
        .to_string();
    for row in &rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        console::set_colors_enabled(false);
        let t = super::table(
            &["ID", "MODEL"],
            &[
                vec!["a".into(), "m1".into()],
                vec!["longer-id".into(), "m2".into()],
            ],
        );
        assert_eq!(t, "ID         MODEL\na          m1\nlonger-id  m2");
    }

    #[test]
    fn times_for_people() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let cases = [
            ("2026-11-30T11:59:50Z", "just now"),
            ("2026-11-30T11:57:00.123Z", "3 min ago"),
            ("2026-11-30T10:00:00Z", "2 h ago"),
            ("2026-11-25T12:00:00Z", "5 days ago"),
            ("2026-01-02T03:04:05Z", "2026-01-02"),
            ("2026-11-30T13:30:00Z", "2026-11-30 13:30"),
            ("not a time", "not a time"),
        ];
        for (iso, said) in cases {
            assert_eq!(super::ago(iso, now), said, "{iso}");
        }
    }

    #[test]
    fn wide_characters_keep_columns_aligned() {
        console::set_colors_enabled(false);
        let t = super::table(
            &["TITLE", "MODEL"],
            &[
                vec!["日本語のタイトル".into(), "m1".into()],
                vec!["plain".into(), "m2".into()],
            ],
        );
        // The MODEL column starts at the same display column on every line.
        let starts: Vec<usize> = t
            .lines()
            .map(|l| console::measure_text_width(&l[..l.rfind(['M', 'm']).unwrap()]))
            .collect();
        assert_eq!(starts, vec![18, 18, 18], "{t}");
    }
}
