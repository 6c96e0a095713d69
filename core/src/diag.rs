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

/// Every diagnostic of one file, ready to print.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub file: &'a str,
    pub source: &'a str,
    pub diagnostics: &'a [Diagnostic],
}

impl fmt::Display for Report<'_> {
    /// Renders each diagnostic as `file:line:col: error: message`, the source line with a caret
    /// underline, and the help when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.diagnostics {
            writeln!(
                f,
                "{}:{}:{}: error: {}",
                self.file, d.pos.line, d.pos.col, d.message
            )?;
            if let Some(text) = self
                .source
                .lines()
                .nth(d.pos.line.saturating_sub(1) as usize)
            {
                let gutter = d.pos.line.to_string();
                let pad = " ".repeat(gutter.len());
                let shown: String = text.chars().take(160).collect();
                writeln!(f, "{pad} |")?;
                writeln!(f, "{gutter} | {shown}")?;
                let lead: String = text
                    .chars()
                    .take(d.pos.col.saturating_sub(1) as usize)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                let width = (d.len as usize).clamp(1, 80);
                writeln!(f, "{pad} | {lead}{}", "^".repeat(width))?;
            }
            if let Some(help) = &d.help {
                writeln!(f, "  = help: {help}")?;
            }
        }
        Ok(())
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
