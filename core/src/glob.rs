//! Glob patterns for webhook filters (branches, tags, paths): `*` matches within a path
//! segment, `**` across `/`, `?` one character other than `/`; a `!` in front excludes. Matching
//! is linear in the pattern times the text (no backtracking blow-up on many stars).

/// Whether `pattern` is one skiff can use.
pub fn check(pattern: &str) -> Result<(), String> {
    let body = pattern.strip_prefix('!').unwrap_or(pattern);
    if body.is_empty() {
        return Err("an empty pattern matches nothing".into());
    }
    if body.len() > 1024 {
        return Err("longer than 1024 bytes".into());
    }
    Ok(())
}

/// Whether `text` matches one pattern (without its `!`).
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // can[j]: the pattern so far matches t[..j].
    let mut can = vec![false; t.len() + 1];
    can[0] = true;
    let mut i = 0;
    while i < p.len() {
        let mut next = vec![false; t.len() + 1];
        match p[i] {
            '*' if p.get(i + 1) == Some(&'*') => {
                // `**` (and `**/`, which may also match nothing).
                let mut reach = false;
                for j in 0..=t.len() {
                    reach |= can[j];
                    next[j] = reach;
                }
                i += 2;
                if p.get(i) == Some(&'/') {
                    // `a/**/b` matches `a/b`: the slash may go with the stars.
                    let mut with_slash = vec![false; t.len() + 1];
                    for j in 0..t.len() {
                        with_slash[j + 1] = next[j] && t[j] == '/';
                    }
                    for j in 0..=t.len() {
                        next[j] = with_slash[j] || (next[j] && can[j]);
                    }
                    i += 1;
                }
                can = next;
                continue;
            }
            '*' => {
                let mut reach = false;
                for j in 0..=t.len() {
                    if j > 0 && t[j - 1] == '/' {
                        reach = false;
                    }
                    reach |= can[j];
                    next[j] = reach;
                }
            }
            '?' => {
                for j in 0..t.len() {
                    next[j + 1] = can[j] && t[j] != '/';
                }
            }
            c => {
                for j in 0..t.len() {
                    next[j + 1] = can[j] && t[j] == c;
                }
            }
        }
        can = next;
        i += 1;
    }
    can[t.len()]
}

/// Whether `text` passes a list of patterns: the last pattern that matches decides (a `!`
/// pattern excludes); with no match, it passes only if every pattern is an exclusion.
pub fn passes(patterns: &[String], text: &str) -> bool {
    let mut verdict = patterns.iter().all(|p| p.starts_with('!'));
    for p in patterns {
        match p.strip_prefix('!') {
            Some(excluded) if matches(excluded, text) => verdict = false,
            None if matches(p, text) => verdict = true,
            _ => {}
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_questions_and_exclusions() {
        assert!(matches("main", "main") && !matches("main", "mainline"));
        assert!(matches("release/*", "release/1.0") && !matches("release/*", "release/1/x"));
        assert!(matches("release/**", "release/1/x") && matches("**", "a/b/c"));
        assert!(matches("docs/**/*.md", "docs/a.md") && matches("docs/**/*.md", "docs/x/y/a.md"));
        assert!(!matches("docs/**/*.md", "src/a.md"));
        assert!(matches("v?.*", "v1.2") && !matches("v?", "v/"));
        assert!(matches("*", "") && !matches("a", ""));
        assert!(matches("a*b*c*d", "axxbyyczzd") && !matches("a*b*c*d", "axxbyyczz"));
        let long = "a".repeat(5000);
        assert!(!matches(&"*a".repeat(200), &format!("{long}b")));

        let filters = |ps: &[&str]| ps.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let f = filters(&["release/**", "!release/**-alpha"]);
        assert!(passes(&f, "release/1.0") && !passes(&f, "release/1.0-alpha"));
        assert!(!passes(&f, "main"));
        let only_out = filters(&["!wip/*"]);
        assert!(passes(&only_out, "main") && !passes(&only_out, "wip/x"));
        assert!(check("!").is_err() && check("").is_err() && check("main").is_ok());
    }
}
