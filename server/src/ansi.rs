//! ANSI colours in logs, as HTML for the web UI. Each line is converted whole; the colour state
//! a line leaves open is carried to the next line, since a converter sees one line at a time.

/// The SGR codes in force at the end of what was converted so far.
#[derive(Default, Debug, Clone)]
pub struct Carry {
    open: Vec<String>,
}

impl Carry {
    /// Converts text (whole lines) to one HTML string per line.
    pub fn lines_to_html(&mut self, text: &str) -> Vec<String> {
        text.lines().map(|line| self.line_to_html(line)).collect()
    }

    fn line_to_html(&mut self, line: &str) -> String {
        let prefix: String = self.open.iter().map(|c| format!("\x1b[{c}m")).collect();
        let input = format!("{prefix}{line}");
        self.track(line);
        match ansi_to_html::convert(&input) {
            Ok(html) => html,
            // Not valid ANSI: show the text, escaped, without colours.
            Err(_) => escape(&strip(line)),
        }
    }

    /// Updates the open SGR codes from the escape sequences in `line`.
    fn track(&mut self, line: &str) {
        let mut rest = line;
        while let Some(i) = rest.find("\x1b[") {
            rest = &rest[i + 2..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == ';'))
                .unwrap_or(rest.len());
            if rest[end..].starts_with('m') {
                let codes = &rest[..end];
                if codes.is_empty() || codes.split(';').any(|c| c == "0" || c.is_empty()) {
                    self.open.clear();
                }
                let kept: Vec<&str> = codes
                    .split(';')
                    .filter(|c| !c.is_empty() && *c != "0")
                    .collect();
                if !kept.is_empty() {
                    self.open.push(kept.join(";"));
                }
                if self.open.len() > 16 {
                    self.open.remove(0);
                }
            }
            rest = &rest[end..];
        }
    }
}

fn strip(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_colour_across_lines_and_escapes() {
        let mut c = Carry::default();
        let lines = c.lines_to_html("\x1b[31mred starts\nstill red <b>\n\x1b[0mplain\n");
        assert!(lines[0].contains("red starts"), "{lines:?}");
        assert!(
            lines[1].contains("<span") && lines[1].contains("&lt;b&gt;"),
            "colour carried, text escaped: {lines:?}"
        );
        assert!(!lines[2].contains("<span"), "reset ends it: {lines:?}");
    }
}
