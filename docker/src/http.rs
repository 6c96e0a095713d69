//! One plain-HTTP GET whose status line is all that is read: the health probe of
//! `docker/deploy` and of `http/wait`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// GET `path` at `authority` (`host:port`) with `Host: host`; the status code, or why there was
/// none.
pub async fn get_status(authority: &str, host: &str, path: &str) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    get_status_over(stream, host, path).await
}

/// The same GET over a connection made elsewhere (through ssh, from an engine's host).
pub async fn get_status_over<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
) -> Result<u16, String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: skiff\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    // "HTTP/1.1 200": twelve bytes.
    let mut head = [0u8; 12];
    let mut n = 0;
    while n < head.len() {
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
        .ok_or_else(|| {
            if n == 0 {
                "no answer (the connection closed)".to_string()
            } else {
                "the answer is not HTTP".to_string()
            }
        })
}
