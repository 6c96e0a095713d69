//! Durations as people write them: `500ms`, `20s`, `30m`, `1h30m`, `2d`.

use std::time::Duration;

/// The longest duration skiff accepts anywhere (a week).
pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses a duration of at most `MAX` (a week); the error is a sentence for the user.
pub fn parse(text: &str) -> Result<Duration, String> {
    parse_up_to(text, MAX)
}

/// Parses a duration of at most `max`, for the few settings that outlast a week (how long runs
/// are kept); the error is a sentence for the user.
pub fn parse_up_to(text: &str, max: Duration) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` has no unit; write `{s}s`, `{s}m` or `{s}h`"));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "`{s}` is not a duration (expected forms like 30s, 5m, 1h30m, 500ms)"
            ));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}` is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{s}`: a number without a unit")),
            other => return Err(format!("`{other}` is not a unit (use ms, s, m, h or d)")),
        };
        total = total.saturating_add(n.saturating_mul(ms));
    }
    let d = Duration::from_millis(u64::try_from(total).unwrap_or(u64::MAX));
    if d.is_zero() {
        return Err("a duration must be longer than zero".into());
    }
    if d > max {
        return Err(format!(
            "`{s}` is longer than the limit of {}",
            written(max)
        ));
    }
    Ok(d)
}

/// A duration as it would be written in a pipeline file, in its largest whole unit: `7d`,
/// `90m`, `1500ms`.
pub fn written(d: Duration) -> String {
    let ms = d.as_millis();
    [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ]
    .into_iter()
    .find(|(unit, _)| ms.is_multiple_of(*unit) && ms > 0)
    .map_or_else(
        || format!("{ms}ms"),
        |(unit, name)| format!("{}{name}", ms / unit),
    )
}

/// Formats a duration compactly for people: `850ms`, `12.3s`, `4m05s`, `1h02m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse("30").expect_err("an error").contains("no unit"));
        assert!(parse("5 min").is_err());
        assert!(parse("0s").is_err());
        assert!(parse("8d").is_err());
        assert!(parse("99999999999999999999999h").is_err());
        assert_eq!(
            parse("8d"),
            Err("`8d` is longer than the limit of 7d".to_string())
        );
    }

    #[test]
    fn parses_with_another_limit() {
        let ten_years = Duration::from_secs(3650 * 86_400);
        assert_eq!(
            parse_up_to("3650d", ten_years),
            Ok(Duration::from_secs(3650 * 86_400))
        );
        assert_eq!(
            parse_up_to("3651d", ten_years),
            Err("`3651d` is longer than the limit of 3650d".to_string())
        );
        assert!(parse_up_to("30", ten_years).is_err());
    }

    #[test]
    fn writes_durations() {
        assert_eq!(written(MAX), "7d");
        assert_eq!(written(Duration::from_secs(5400)), "90m");
        assert_eq!(written(Duration::from_millis(1500)), "1500ms");
        assert_eq!(written(Duration::from_secs(3600)), "1h");
    }
}
