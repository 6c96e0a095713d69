//! ANSI colours in logs, as HTML for the web UI. Colours and styles become classes (`f1`: red
//! text, `b4`: blue background, `ab`: bold...), never `style` attributes, so the page keeps a
//! strict Content-Security-Policy and the stylesheet themes the 16 colours for contrast; 256-colour
//! and truecolor codes map to the nearest of the 16. Each line is converted whole; the state a
//! line leaves open is carried to the next line, since a converter sees one line at a time.
//! A line that moves its cursor back (carriage returns, backspaces, cursor moves: progress redrawn
//! in place) shows what a terminal ends up showing, later text over earlier text column by column
//! and erased where it was erased; other escape sequences (titles, cursor moves to other lines)
//! are dropped. The stored log keeps the bytes.

/// What is in force: colours (0-15) and styles.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Style {
    fg: Option<u8>,
    bg: Option<u8>,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    inverse: bool,
}

impl Style {
    fn classes(&self) -> String {
        let (fg, bg) = if self.inverse {
            (self.bg.or(Some(0)), self.fg.or(Some(7)))
        } else {
            (self.fg, self.bg)
        };
        let mut c = Vec::new();
        if let Some(f) = fg {
            c.push(format!("f{f}"));
        }
        if let Some(b) = bg {
            c.push(format!("b{b}"));
        }
        for (on, name) in [
            (self.bold, "ab"),
            (self.dim, "ad"),
            (self.italic, "ai"),
            (self.underline, "au"),
        ] {
            if on {
                c.push(name.to_string());
            }
        }
        c.join(" ")
    }

    /// Applies one SGR sequence's parameters.
    fn apply(&mut self, params: &str) {
        let codes: Vec<u32> = params
            .split([';', ':'])
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        let mut i = 0;
        while i < codes.len() {
            match codes[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                7 => self.inverse = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                27 => self.inverse = false,
                n @ 30..=37 => self.fg = Some(colour(n - 30)),
                n @ 90..=97 => self.fg = Some(colour(n - 90 + 8)),
                39 => self.fg = None,
                n @ 40..=47 => self.bg = Some(colour(n - 40)),
                n @ 100..=107 => self.bg = Some(colour(n - 100 + 8)),
                49 => self.bg = None,
                n @ (38 | 48) => {
                    let (value, used) = extended(&codes[i + 1..]);
                    if n == 38 {
                        self.fg = value;
                    } else {
                        self.bg = value;
                    }
                    i += used;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

fn colour(n: u32) -> u8 {
    u8::try_from(n).unwrap_or(0)
}

/// `5;N` (256 colours) or `2;R;G;B` (truecolor) after a 38/48: the nearest of the 16, and how
/// many codes it took.
fn extended(rest: &[u32]) -> (Option<u8>, usize) {
    match rest {
        [5, n, ..] => (Some(nearest_256(*n)), 2),
        [2, r, g, b, ..] => (Some(nearest_rgb([*r, *g, *b])), 4),
        [5] => (None, 1),
        [2, ..] => (None, rest.len()),
        _ => (None, 0),
    }
}

/// The 16 colours as xterm draws them, to find the nearest.
const PALETTE: [[u32; 3]; 16] = [
    [0, 0, 0],
    [205, 0, 0],
    [0, 205, 0],
    [205, 205, 0],
    [0, 0, 238],
    [205, 0, 205],
    [0, 205, 205],
    [229, 229, 229],
    [127, 127, 127],
    [255, 0, 0],
    [0, 255, 0],
    [255, 255, 0],
    [92, 92, 255],
    [255, 0, 255],
    [0, 255, 255],
    [255, 255, 255],
];

fn nearest_rgb(rgb: [u32; 3]) -> u8 {
    let rgb = rgb.map(|v| v.min(255));
    let mut best = (u32::MAX, 0u8);
    for (i, p) in (0u8..).zip(PALETTE.iter()) {
        let d: u32 = (0..3).map(|k| rgb[k].abs_diff(p[k]).pow(2)).sum();
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

fn nearest_256(n: u32) -> u8 {
    match n {
        0..=15 => colour(n),
        16..=231 => {
            let n = n - 16;
            let level = |v: u32| if v == 0 { 0 } else { 55 + v * 40 };
            nearest_rgb([level(n / 36), level(n / 6 % 6), level(n % 6)])
        }
        232..=255 => {
            let v = 8 + (n - 232) * 10;
            nearest_rgb([v, v, v])
        }
        _ => 7,
    }
}

/// The style in force at the end of what was converted so far.
#[derive(Default, Debug, Clone)]
pub struct Carry {
    style: Style,
}

impl Carry {
    /// Converts text (whole lines) to one HTML string per line.
    pub fn lines_to_html(&mut self, text: &str) -> Vec<String> {
        text.lines().map(|line| self.line_to_html(line)).collect()
    }

    fn line_to_html(&mut self, line: &str) -> String {
        let moves_back = line.contains(['\r', '\x08'])
            || (line.contains('\x1b') && line.contains(['D', 'G', 'K']));
        if moves_back {
            return self.redrawn_line_to_html(line);
        }
        let mut out = String::with_capacity(line.len() + 16);
        let mut run = String::new();
        let mut shown = self.style;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '\x1b' {
                if self.style != shown {
                    flush(&mut out, &mut run, shown);
                    shown = self.style;
                }
                run.push(c);
                continue;
            }
            if let Some((params, 'm')) = escape_sequence(&mut chars) {
                self.style.apply(&params);
            }
        }
        flush(&mut out, &mut run, shown);
        out
    }

    /// A line that moves its cursor back (carriage returns, backspaces: progress redrawn in
    /// place) shows what a terminal would end up showing: later text overwrites earlier text
    /// column by column, and erasing (`ESC[K`, `ESC[1K`, `ESC[2K`) and moving the cursor
    /// (`ESC[nG`, `ESC[nC`, `ESC[nD`) work as they do there.
    fn redrawn_line_to_html(&mut self, line: &str) -> String {
        let blank = (' ', Style::default());
        let mut cells: Vec<(char, Style)> = Vec::with_capacity(line.len());
        let mut col = 0usize;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => col = 0,
                '\x08' => col = col.saturating_sub(1),
                '\x1b' => {
                    let Some((params, end)) = escape_sequence(&mut chars) else {
                        continue;
                    };
                    // A line's cells are bounded by its length: a cursor moved further is
                    // held there.
                    let n = params.parse::<usize>().unwrap_or(1).clamp(1, line.len());
                    match end {
                        'm' => self.style.apply(&params),
                        'K' => match params.as_str() {
                            "1" => {
                                let upto = (col + 1).min(cells.len());
                                cells[..upto].fill(blank);
                            }
                            "2" => {
                                cells.fill(blank);
                                cells.truncate(col);
                            }
                            _ => cells.truncate(col),
                        },
                        'G' => col = n - 1,
                        'C' => col = (col + n).min(line.len()),
                        'D' => col = col.saturating_sub(n),
                        _ => {}
                    }
                }
                c => {
                    if col < cells.len() {
                        cells[col] = (c, self.style);
                    } else {
                        cells.resize(col, blank);
                        cells.push((c, self.style));
                    }
                    col += 1;
                }
            }
        }
        let mut out = String::with_capacity(cells.len() + 16);
        let mut run = String::new();
        let mut shown = Style::default();
        for (c, style) in cells {
            if style != shown {
                flush(&mut out, &mut run, shown);
                shown = style;
            }
            run.push(c);
        }
        flush(&mut out, &mut run, shown);
        out
    }
}

/// What follows an ESC, consumed: a control sequence's parameters and final character, or None
/// for anything else (an OSC, up to BEL or ESC \, or a single character).
fn escape_sequence(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<(String, char)> {
    match chars.peek() {
        Some('[') => {
            chars.next();
            let mut params = String::new();
            for d in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&d) {
                    return Some((params, d));
                }
                if params.len() < 64 {
                    params.push(d);
                }
            }
            None
        }
        Some(']') => {
            chars.next();
            while let Some(d) = chars.next() {
                if d == '\x07' {
                    break;
                }
                if d == '\x1b' {
                    if chars.peek() == Some(&'\\') {
                        chars.next();
                    }
                    break;
                }
            }
            None
        }
        Some(_) => {
            chars.next();
            None
        }
        None => None,
    }
}

fn flush(out: &mut String, run: &mut String, style: Style) {
    if run.is_empty() {
        return;
    }
    let classes = style.classes();
    if classes.is_empty() {
        out.push_str(&escape(run));
    } else {
        out.push_str("<span class=\"");
        out.push_str(&classes);
        out.push_str("\">");
        out.push_str(&escape(run));
        out.push_str("</span>");
    }
    run.clear();
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

    fn html(text: &str) -> Vec<String> {
        Carry::default().lines_to_html(text)
    }

    #[test]
    fn carries_colour_across_lines_and_escapes() {
        let mut c = Carry::default();
        let lines = c.lines_to_html("\x1b[31mred starts\nstill red <b>\n\x1b[0mplain\n");
        assert_eq!(lines[0], "<span class=\"f1\">red starts</span>");
        assert_eq!(lines[1], "<span class=\"f1\">still red &lt;b&gt;</span>");
        assert_eq!(lines[2], "plain", "reset ends it");
    }

    #[test]
    fn colours_are_classes_never_styles() {
        assert_eq!(
            html("a\x1b[1;32mb\x1b[22mc\x1b[39;44md\x1b[0m")[0],
            "a<span class=\"f2 ab\">b</span><span class=\"f2\">c</span><span class=\"b4\">d</span>"
        );
        assert_eq!(html("\x1b[91mx")[0], "<span class=\"f9\">x</span>");
        // 256 colours and truecolor: the nearest of the 16.
        assert_eq!(html("\x1b[38;5;196mx")[0], "<span class=\"f9\">x</span>");
        assert_eq!(html("\x1b[38;5;4mx")[0], "<span class=\"f4\">x</span>");
        assert_eq!(
            html("\x1b[38;2;0;200;0mx")[0],
            "<span class=\"f2\">x</span>"
        );
        assert_eq!(html("\x1b[48;5;244mx")[0], "<span class=\"b8\">x</span>");
        // Inverse swaps; other sequences vanish; broken ones do no harm.
        assert_eq!(html("\x1b[7mx")[0], "<span class=\"f0 b7\">x</span>");
        assert_eq!(html("\x1b[2K\x1b]0;title\x07ok")[0], "ok");
        // Progress redrawn with carriage returns shows its last state (the colour carried).
        assert_eq!(
            html("10%\r20%\r\x1b[32m30%\r")[0],
            "<span class=\"f2\">30%</span>"
        );
        assert_eq!(
            html("a\x1b[31mb\rc\r\n\x1b[0md\n"),
            ["<span class=\"f1\">cb</span>", "d"]
        );
        assert_eq!(html("\x1b[38;5mx\x1b[38;2;1m\x1b")[0], "x");
    }

    #[test]
    fn a_redrawn_line_shows_what_a_terminal_would() {
        // Later text overwrites earlier text column by column; what it does not reach stays.
        assert_eq!(html("downloading 100%\rdone")[0], "doneloading 100%");
        assert_eq!(
            html("50% [=====     ]\r100% [==========]")[0],
            "100% [==========]"
        );
        // Erased to the end of the line, as progress bars clear before they redraw.
        assert_eq!(html("downloading 100%\rdone\x1b[K")[0], "done");
        assert_eq!(html("downloading\r\x1b[2Kok")[0], "ok");
        assert_eq!(html("abcdef\x1b[3D\x1b[1K!")[0], "   !ef");
        assert_eq!(html("abc\x1b[3D\x1b[Kx")[0], "x");
        // Backspaces and cursor moves; a cursor sent far away is held within the line.
        assert_eq!(html("abc\x08\x08X")[0], "aXc");
        assert_eq!(html("abc\x1b[1GZ\r\x1b[2CY")[0], "ZbY");
        assert_eq!(html("ab\r\x1b[999999999999Cz").len(), 1);
        assert_eq!(html("\x08\x08\rx")[0], "x");
        // Colours stay with the cells they were written in, and carry to the next line.
        assert_eq!(
            html("\x1b[31mfailed\r\x1b[32mok\nnext")[..],
            [
                "<span class=\"f2\">ok</span><span class=\"f1\">iled</span>",
                "<span class=\"f2\">next</span>"
            ]
        );
        assert_eq!(html("a<b\r&")[0], "&amp;&lt;b");
        for line in html("\x1b[31;41;1;2;3;4;7;38;5;100;48;2;1;2;3mx") {
            assert!(!line.contains("style"), "{line}");
        }
    }
}
