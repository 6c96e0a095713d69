//! Cutting byte streams that are mostly UTF-8 text (logs) without splitting a character: a
//! piece decoded on its own must not end with half of one.

/// Whether `b` continues a multi-byte UTF-8 character.
fn continues(b: u8) -> bool {
    b & 0b1100_0000 == 0b1000_0000
}

/// Where to cut `data` at or before `at` without splitting a character: `at` moved back over at
/// most three continuation bytes. When that would leave nothing before the cut, the cut moves
/// forward past the character instead, so that a piece is never empty. Bytes that are not UTF-8
/// are cut where asked (give or take the three bytes).
pub fn cut_at_char(data: &[u8], at: usize) -> usize {
    if at >= data.len() {
        return complete_prefix(data);
    }
    let mut cut = at;
    while cut > at.saturating_sub(3) && continues(data[cut]) {
        cut -= 1;
    }
    if continues(data[cut]) {
        // Four continuation bytes in a row: not UTF-8 here.
        return at.max(1);
    }
    if cut > 0 {
        return cut;
    }
    // The character that `at` is inside of starts the piece: end the piece after it instead.
    let mut end = at.max(1);
    while end < data.len() && end < 4 && continues(data[end]) {
        end += 1;
    }
    end
}

/// The length of `data` without an incomplete character at its end (whose other bytes are yet
/// to come), unless that would leave nothing.
fn complete_prefix(data: &[u8]) -> usize {
    let len = data.len();
    for back in 1..=len.min(3) {
        let b = data[len - back];
        if continues(b) {
            continue;
        }
        let needs = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if back < needs && len - back > 0 {
            len - back
        } else {
            len
        };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::cut_at_char;

    #[test]
    fn cuts_between_characters() {
        let text = "a€€b".as_bytes(); // a, 3 bytes, 3 bytes, b
        let euro = "€€".as_bytes();
        assert_eq!(cut_at_char(text, 0), 1);
        assert_eq!(cut_at_char(text, 1), 1);
        assert_eq!(cut_at_char(text, 2), 1);
        assert_eq!(cut_at_char(text, 3), 1);
        assert_eq!(cut_at_char(text, 4), 4);
        assert_eq!(cut_at_char(text, 6), 4);
        assert_eq!(cut_at_char(text, 7), 7);
        assert_eq!(cut_at_char(text, 8), 8);
        assert_eq!(cut_at_char(text, 99), 8);
        // At the end, an incomplete last character is left for the next piece.
        assert_eq!(cut_at_char(&text[..6], 6), 4);
        assert_eq!(cut_at_char(&text[..5], 9), 4);
        assert_eq!(cut_at_char(&text[..7], 7), 7);
        assert_eq!(cut_at_char(&euro[..2], 2), 2);
        // A piece that would be only part of the first character takes the whole character.
        assert_eq!(cut_at_char(euro, 1), 3);
        assert_eq!(cut_at_char(euro, 2), 3);
        assert_eq!(cut_at_char(euro, 4), 3);
        // Every piece decodes on its own.
        let long = "€".repeat(1000);
        let bytes = long.as_bytes();
        for size in 1..10 {
            let mut at = 0;
            while at < bytes.len() {
                let end = at + cut_at_char(&bytes[at..], size);
                assert!(std::str::from_utf8(&bytes[at..end]).is_ok());
                at = end;
            }
        }
        // Not UTF-8 at all: cut where asked, never an empty piece.
        assert_eq!(cut_at_char(&[0x80; 10], 5), 5);
        assert_eq!(cut_at_char(&[0xff; 10], 0), 1);
    }
}
