//! Diagnostics: every problem found in a pipeline file, with its position.

use std::fmt;

/// A position in a source file, both 1-based, the column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub fn new(line: u32, col: u32) -> Self {
        Pos { line, col }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub pos: Pos,
    /// How many characters the underline covers (at least 1).
    pub len: u32,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            pos,
            len: 1,
            message: message.into(),
            help: None,
        }
    }

    pub fn with_len(mut self, len: usize) -> Self {
        self.set_len(len);
        self
    }

    /// Sets how many characters the underline covers (at least 1).
    pub fn set_len(&mut self, len: usize) -> &mut Self {
        self.len = u32::try_from(len.max(1)).unwrap_or(u32::MAX);
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// The lines of a source text, indexed once so that fetching one by number, or a column of it,
/// does not scan the text again (a file can have tens of thousands of diagnostics).
#[derive(Debug, Clone)]
pub struct Lines<'a> {
    source: &'a str,
    /// The byte offset where each line starts.
    starts: Vec<usize>,
    /// Whether each line is ASCII, where a column is a byte offset.
    ascii: Vec<bool>,
}

impl<'a> Lines<'a> {
    pub fn new(source: &'a str) -> Self {
        let starts: Vec<usize> = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let ascii = starts
            .iter()
            .enumerate()
            .map(|(i, &start)| {
                let end = starts.get(i + 1).map_or(source.len(), |&next| next);
                source.as_bytes()[start..end].is_ascii()
            })
            .collect();
        Lines {
            source,
            starts,
            ascii,
        }
    }

    /// Line `line` (1-based) without its line ending, as `str::lines` would give it.
    pub fn get(&self, line: u32) -> Option<&'a str> {
        let i = usize::try_from(line).ok()?.checked_sub(1)?;
        let start = *self.starts.get(i)?;
        if start >= self.source.len() {
            return None;
        }
        let end = self
            .starts
            .get(i + 1)
            .map_or(self.source.len(), |next| next - 1);
        let text = &self.source[start..end];
        Some(text.strip_suffix('\r').unwrap_or(text))
    }

    /// The byte offset in line `line` of its character number `chars` (0-based), or the line's
    /// length when it is shorter.
    pub fn byte_of(&self, line: u32, chars: usize) -> usize {
        let Some(text) = self.get(line) else {
            return 0;
        };
        let ascii = (line as usize)
            .checked_sub(1)
            .and_then(|i| self.ascii.get(i))
            .copied()
            .unwrap_or(false);
        if ascii {
            chars.min(text.len())
        } else {
            text.char_indices()
                .nth(chars)
                .map_or(text.len(), |(b, _)| b)
        }
    }

    /// The rest of the line from `pos` (empty past its end).
    pub fn from(&self, pos: Pos) -> Option<&'a str> {
        let text = self.get(pos.line)?;
        let col = pos.col.checked_sub(1)? as usize;
        let at = self.byte_of(pos.line, col);
        Some(&text[at..])
    }
}

/// How many characters of a source line a report shows.
const SHOWN: usize = 160;

/// `c` as it is safe to print on a terminal: control characters other than a tab are shown as
/// their Unicode pictures (`␀`, `␛`), so a file cannot send escape sequences through a report.
fn visible(c: char) -> char {
    match c {
        '\t' => c,
        '\u{0}'..='\u{1f}' => char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
        '\u{7f}' => '\u{2421}',
        _ if c.is_control() => '\u{fffd}',
        _ => c,
    }
}

fn printable(s: &str) -> String {
    s.chars().map(visible).collect()
}

/// Every diagnostic of one file, ready to print.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub file: &'a str,
    pub source: &'a str,
    pub diagnostics: &'a [Diagnostic],
}

impl fmt::Display for Report<'_> {
    /// Renders each diagnostic as `file:line:col: error: message`, the source line with a caret
    /// underline, and the help when there is one. A long line is shown as a window around the
    /// column.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines = Lines::new(self.source);
        for d in self.diagnostics {
            writeln!(
                f,
                "{}:{}:{}: error: {}",
                self.file,
                d.pos.line,
                d.pos.col,
                printable(&d.message)
            )?;
            if let Some(text) = lines.get(d.pos.line) {
                let gutter = d.pos.line.to_string();
                let pad = " ".repeat(gutter.len());
                let col = d.pos.col.saturating_sub(1) as usize;
                let from = if col < SHOWN - 40 { 0 } else { col - 40 };
                let start = lines.byte_of(d.pos.line, from);
                let at = lines.byte_of(d.pos.line, col).max(start);
                let ellipsis = if from > 0 { "…" } else { "" };
                let shown: String = text[start..].chars().take(SHOWN).map(visible).collect();
                writeln!(f, "{pad} |")?;
                writeln!(f, "{gutter} | {ellipsis}{shown}")?;
                let lead: String = ellipsis
                    .chars()
                    .map(|_| ' ')
                    .chain(
                        text[start..at]
                            .chars()
                            .map(|c| if c == '\t' { '\t' } else { ' ' }),
                    )
                    .collect();
                let width = (d.len as usize).clamp(1, 80);
                writeln!(f, "{pad} | {lead}{}", "^".repeat(width))?;
            }
            if let Some(help) = &d.help {
                writeln!(f, "  = help: {}", printable(help))?;
            }
        }
        Ok(())
    }
}

/// "1 problem", "2 problems": a count of diagnostics in words, as the terminal and the UI say it.
pub fn problems(n: usize) -> String {
    if n == 1 {
        "1 problem".to_string()
    } else {
        format!("{n} problems")
    }
}

/// The closest candidate to `word`, when one is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word.to_lowercase(), &c.to_lowercase()),
                c,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `did you mean ...?` for the closest candidate, if any.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    suggest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_str_lines() {
        for source in ["", "a", "a\n", "a\nb", "a\r\nb\r\n", "\n\n", "x\n\ny\n"] {
            let lines = Lines::new(source);
            let want: Vec<&str> = source.lines().collect();
            let got: Vec<&str> = (1..=want.len() as u32 + 1)
                .map_while(|n| lines.get(n))
                .collect();
            assert_eq!(got, want, "{source:?}");
            assert_eq!(lines.get(0), None);
        }
    }

    #[test]
    fn columns_are_characters() {
        let lines = Lines::new("ascii\nçà x\n");
        assert_eq!(lines.byte_of(1, 2), 2);
        assert_eq!(lines.byte_of(2, 2), 4);
        assert_eq!(lines.byte_of(2, 99), 6);
        assert_eq!(lines.from(Pos::new(2, 4)), Some("x"));
        assert_eq!(lines.from(Pos::new(2, 5)), Some(""));
        assert_eq!(lines.from(Pos::new(2, 6)), Some(""));
        assert_eq!(lines.from(Pos::new(3, 1)), None);
    }

    #[test]
    fn a_long_line_is_shown_around_the_column() {
        let source = format!("{}BAD{}\n", "x".repeat(5000), "y".repeat(5000));
        let diagnostics = [Diagnostic::new(Pos::new(1, 5001), "bad").with_len(3)];
        let out = Report {
            file: "f.yml",
            source: &source,
            diagnostics: &diagnostics,
        }
        .to_string();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[2].contains("BAD") && lines[2].chars().count() < 200,
            "{out}"
        );
        let caret = lines[3].find('^').expect("caret");
        let under: String = lines[2].chars().skip(caret).take(3).collect();
        assert_eq!(under, "BAD", "{out}");
    }

    #[test]
    fn control_characters_are_shown_as_pictures() {
        let source = "a: \u{1b}[31mred\u{0}\n";
        let diagnostics = [Diagnostic::new(Pos::new(1, 4), "bad `\u{1b}[31m`")];
        let out = Report {
            file: "f.yml",
            source,
            diagnostics: &diagnostics,
        }
        .to_string();
        assert!(!out.contains('\u{1b}') && !out.contains('\u{0}'), "{out:?}");
        assert!(
            out.contains("a: ␛[31mred␀") && out.contains("bad `␛[31m`"),
            "{out}"
        );
    }
}
