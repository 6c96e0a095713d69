//! `http/wait`: GET a URL until it answers with the expected status, or the time is up.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ActionContext, DurationText};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    url: String,
    status: Option<u16>,
    timeout: Option<DurationText>,
    interval: Option<DurationText>,
}

struct Target {
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        if url.starts_with("https://") {
            format!("`{url}`: http/wait speaks plain http:// (it is for health checks on the node itself)")
        } else {
            format!("`{url}` is not an http:// URL")
        }
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['@', ' ']) || path.contains([' ', '\r', '\n']) {
        return Err(format!("`{url}` is not a valid URL"));
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        authority,
        path: path.to_string(),
    })
}

/// One GET; the status code, or why there was none.
async fn probe(target: &Target, host: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect(&target.authority)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: skiff\r\nConnection: close\r\n\r\n",
        target.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let read = stream
            .read(&mut head[n..])
            .await
            .map_err(|e| e.to_string())?;
        if read == 0 {
            break;
        }
        n += read;
    }
    let line = String::from_utf8_lossy(&head[..n]);
    line.strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| "the answer is not HTTP".to_string())
}

pub async fn run(
    inputs: Inputs,
    cx: &ActionContext<'_>,
) -> Result<BTreeMap<String, String>, String> {
    let target = parse_url(&inputs.url)?;
    let host = target.authority.trim_end_matches(":80").to_string();
    let want = inputs.status.unwrap_or(200);
    let timeout = inputs.timeout.map_or(Duration::from_secs(30), |d| d.0);
    let interval = inputs.interval.map_or(Duration::from_millis(250), |d| d.0);
    let until = Instant::now() + timeout;
    let until = cx.deadline.map_or(until, |d| d.min(until));
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = until.saturating_duration_since(Instant::now());
        let outcome =
            match tokio::time::timeout(left.max(Duration::from_millis(1)), probe(&target, &host))
                .await
            {
                Ok(r) => r,
                Err(_) => Err("no answer in time".to_string()),
            };
        let last = match outcome {
            Ok(code) if code == want => {
                cx.note(&format!(
                    "{} answered {code} after {attempts} attempt(s)",
                    inputs.url
                ))
                .await;
                return Ok(BTreeMap::from([
                    ("status".into(), code.to_string()),
                    ("attempts".into(), attempts.to_string()),
                ]));
            }
            Ok(code) => format!("answered {code}, waiting for {want}"),
            Err(e) => e,
        };
        if attempts == 1 || attempts.is_multiple_of(20) {
            cx.note(&format!("{}: {last} (attempt {attempts})", inputs.url))
                .await;
        }
        if Instant::now() + interval >= until {
            return Err(format!(
                "{} was not ready within {:?}: {last}",
                inputs.url, timeout
            ));
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = cx.stop.cancelled() => return Err("stopped".into()),
        }
    }
}
