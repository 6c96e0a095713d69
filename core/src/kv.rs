//! `KEY=value` files: step outputs (`$SKIFF_OUTPUT`) and the secrets file share this format.
//!
//! A line `KEY=value` sets KEY to the rest of the line. `KEY<<DELIM` starts a multi-line value
//! that ends at a line holding only DELIM. Blank lines and lines starting with `#` are ignored.

/// A line that could not be read, with its 1-based number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError {
    pub line: usize,
    pub message: String,
}

/// Parses the whole text; later values of a key replace earlier ones. Returns what could be
/// read and the lines that could not.
pub fn parse(text: &str) -> (Vec<(String, String)>, Vec<KvError>) {
    let mut out: Vec<(String, String)> = Vec::new();
    // Where each key is in `out`: a repeated key replaces its value in one lookup, so a file of
    // n lines parses in linear time.
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut errors = Vec::new();
    let mut lines = text.lines().enumerate();
    let mut set = |key: &str, value: String| match index.get(key) {
        Some(&i) => out[i].1 = value,
        None => {
            index.insert(key.to_string(), out.len());
            out.push((key.to_string(), value));
        }
    };
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some((key, delim)) = line.split_once("<<").filter(|(k, _)| !k.contains('=')) {
            let (key, delim) = (key.trim(), delim.trim());
            if !crate::pipeline::valid_ident(key) || delim.is_empty() {
                errors.push(KvError {
                    line: n + 1,
                    message: format!("`{}` is not KEY<<DELIMITER", truncate(line)),
                });
                continue;
            }
            let mut value: Vec<&str> = Vec::new();
            let mut closed = false;
            for (_, l) in lines.by_ref() {
                if l == delim {
                    closed = true;
                    break;
                }
                value.push(l);
            }
            if !closed {
                errors.push(KvError {
                    line: n + 1,
                    message: format!("`{key}<<{delim}` is never closed by a line `{delim}`"),
                });
            }
            set(key, value.join("\n"));
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if crate::pipeline::valid_ident(key.trim()) => {
                set(key.trim(), value.to_string())
            }
            _ => errors.push(KvError {
                line: n + 1,
                message: format!("`{}` is not KEY=value", truncate(line)),
            }),
        }
    }
    (out, errors)
}

fn truncate(line: &str) -> String {
    line.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_heredocs() {
        let (kv, errors) =
            parse("a=1\n# comment\n\nb = x=y\nmulti<<EOF\nline 1\nline 2\nEOF\nbad line\na=2\n");
        assert_eq!(
            kv,
            vec![
                ("a".into(), "2".into()),
                ("b".into(), " x=y".into()),
                ("multi".into(), "line 1\nline 2".into())
            ]
        );
        assert_eq!(
            errors,
            vec![KvError {
                line: 9,
                message: "`bad line` is not KEY=value".into()
            }]
        );
        let (_, errors) = parse("open<<END\nnever closed\n");
        assert_eq!(errors.len(), 1);
    }
}
