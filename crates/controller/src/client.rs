//! A small HTTP/1.1 client for hilctl and the HTTP PDU driver: one request per
//! connection, plain `http://` only (put a TLS-terminating proxy in front, or run
//! hilctl on the controller host).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0:?} (expected http://host:port/path)")]
    Url(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("malformed HTTP response: {0}")]
    Protocol(String),
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected response body: {0}")]
    Body(String),
}

/// Sends one request and returns (status, body).
pub async fn http_request(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Result<(u16, Vec<u8>), ClientError> {
    http_request_with(method, url, bearer, body, &[]).await
}

pub async fn http_request_with(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
    extra: &[(&str, &str)],
) -> Result<(u16, Vec<u8>), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(ClientError::Url(url.into()));
    }
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| ClientError::Io(addr.clone(), e))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: hilctl\r\n"
    );
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in extra {
        if !v.contains(['\r', '\n']) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    let payload = match body {
        Some((ct, b)) => {
            req.push_str(&format!(
                "Content-Type: {ct}\r\nContent-Length: {}\r\n",
                b.len()
            ));
            b
        }
        None => {
            req.push_str("Content-Length: 0\r\n");
            Vec::new()
        }
    };
    req.push_str("\r\n");
    let io = |e| ClientError::Io(addr.clone(), e);
    s.write_all(req.as_bytes()).await.map_err(io)?;
    s.write_all(&payload)
        .await
        .map_err(|e| ClientError::Io(addr.clone(), e))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .await
        .map_err(|e| ClientError::Io(addr.clone(), e))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no header terminator".into()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {status_line:?}")))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let nl = body[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::Protocol("truncated chunk size".into()))?;
        let size_s = String::from_utf8_lossy(&body[i..i + nl]);
        let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ClientError::Protocol(format!("chunk size {size_s:?}")))?;
        i += nl + 2;
        if size == 0 {
            break;
        }
        if i + size > body.len() {
            return Err(ClientError::Protocol("truncated chunk".into()));
        }
        out.extend_from_slice(&body[i..i + size]);
        i += size + 2;
    }
    Ok((status, out))
}

/// The controller's REST API.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub token: Option<String>,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Vec<u8>, ClientError> {
        self.call_with(method, path, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        extra: &[(&str, &str)],
    ) -> Result<Vec<u8>, ClientError> {
        let (status, b) = http_request_with(
            method,
            &format!("{}{path}", self.base),
            self.token.as_deref(),
            body,
            extra,
        )
        .await?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&b).into_owned());
            return Err(ClientError::Status { status, message });
        }
        Ok(b)
    }

    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<serde_json::Value, ClientError> {
        let b = self.call(method, path, body).await?;
        serde_json::from_slice(&b).map_err(|e| ClientError::Body(e.to_string()))
    }

    pub async fn submit(
        &self,
        file_name: &str,
        yaml: String,
    ) -> Result<serde_json::Value, ClientError> {
        // The file name travels in a header so errors read "<file>: line N: ...".
        let b = self
            .call_with(
                "POST",
                "/api/campaigns",
                Some(("application/yaml", yaml.into_bytes())),
                &[("X-Campaign-File", file_name)],
            )
            .await?;
        serde_json::from_slice(&b).map_err(|e| ClientError::Body(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"hi"[..]));
        let (s, b) = parse_response(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"abcde"[..]));
        assert!(parse_response(b"garbage").is_err());
    }
}
