//! Splits `<think>...</think>` spans out of streamed content (models that reason inline).

/// Streaming splitter: feed content deltas, get `(reasoning, content)` pieces back. A tag cut
/// across two deltas is held back until the next delta decides it.
#[derive(Debug, Default)]
pub struct ThinkSplitter {
    inside: bool,
    held: String,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

impl ThinkSplitter {
    /// Splits one delta. Returns the reasoning text and the content text it contained.
    pub fn push(&mut self, delta: &str) -> (String, String) {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(delta);
        let mut reasoning = String::new();
        let mut content = String::new();
        let mut rest = text.as_str();
        loop {
            let tag = if self.inside { CLOSE } else { OPEN };
            let out = if self.inside {
                &mut reasoning
            } else {
                &mut content
            };
            match rest.find(tag) {
                Some(i) => {
                    out.push_str(&rest[..i]);
                    rest = &rest[i + tag.len()..];
                    self.inside = !self.inside;
                }
                None => {
                    // Hold back a suffix that could be the start of the tag.
                    let keep = (1..tag.len())
                        .rev()
                        .find(|&n| {
                            rest.len() >= n
                                && rest.is_char_boundary(rest.len() - n)
                                && tag.starts_with(&rest[rest.len() - n..])
                        })
                        .unwrap_or(0);
                    out.push_str(&rest[..rest.len() - keep]);
                    self.held = rest[rest.len() - keep..].to_owned();
                    break;
                }
            }
        }
        (reasoning, content)
    }

    /// Whatever is still held back when the stream ends.
    pub fn finish(&mut self) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        if self.inside {
            (held, String::new())
        } else {
            (String::new(), held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(parts: &[&str]) -> (String, String) {
        let mut s = ThinkSplitter::default();
        let (mut r, mut c) = (String::new(), String::new());
        for p in parts {
            let (a, b) = s.push(p);
            r.push_str(&a);
            c.push_str(&b);
        }
        let (a, b) = s.finish();
        r.push_str(&a);
        c.push_str(&b);
        (r, c)
    }

    #[test]
    fn splits_spans_across_deltas() {
        assert_eq!(run(&["plain"]), (String::new(), "plain".into()));
        assert_eq!(
            run(&["<think>why", " so</think>Answer"]),
            ("why so".into(), "Answer".into())
        );
        assert_eq!(
            run(&["a<thi", "nk>r1</th", "ink>b <", "3"]),
            ("r1".into(), "ab <3".into())
        );
        assert_eq!(
            run(&["<think>unfinished"]),
            ("unfinished".into(), String::new())
        );
        assert_eq!(run(&["x <", "y"]), (String::new(), "x <y".into()));
        assert_eq!(run(&["é<", "think>ü</think>"]), ("ü".into(), "é".into()));
    }
}
