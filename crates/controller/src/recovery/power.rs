//! Power-control drivers: a command hook, an HTTP PDU, and the emulator's power socket.

use crate::config::PowerConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("power driver unreachable: {0}")]
    Unreachable(String),
    #[error("power driver refused {action}: {detail}")]
    Refused { action: String, detail: String },
}

pub fn min_off_ms(p: &PowerConfig) -> u64 {
    match p {
        PowerConfig::Command { min_off_ms, .. }
        | PowerConfig::Http { min_off_ms, .. }
        | PowerConfig::Sim { min_off_ms, .. } => *min_off_ms,
    }
}

/// Runs `action` (on, off, status) and returns the driver's answer.
pub async fn act(p: &PowerConfig, board: &str, action: &str) -> Result<String, PowerError> {
    match p {
        PowerConfig::Command { command, .. } => {
            let cmd = command
                .replace("{action}", action)
                .replace("{board}", board);
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .output()
                .await
                .map_err(|e| PowerError::Unreachable(format!("{cmd}: {e}")))?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() {
                Ok(text)
            } else {
                Err(PowerError::Refused {
                    action: action.into(),
                    detail: format!(
                        "{cmd} exited with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                })
            }
        }
        PowerConfig::Http { url, .. } => {
            let url = url.replace("{action}", action).replace("{board}", board);
            let (status, body) = crate::client::http_request("POST", &url, None, None)
                .await
                .map_err(|e| PowerError::Unreachable(format!("{url}: {e}")))?;
            if (200..300).contains(&status) {
                Ok(String::from_utf8_lossy(&body).trim().to_string())
            } else {
                Err(PowerError::Refused {
                    action: action.into(),
                    detail: format!("HTTP {status}"),
                })
            }
        }
        PowerConfig::Sim { addr, .. } => {
            let line = format!("{action}\n");
            let reply = if addr.contains('/') {
                let s = tokio::net::UnixStream::connect(addr)
                    .await
                    .map_err(|e| PowerError::Unreachable(format!("{addr}: {e}")))?;
                line_exchange(s, &line).await
            } else {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| PowerError::Unreachable(format!("{addr}: {e}")))?;
                line_exchange(s, &line).await
            }
            .map_err(|e| PowerError::Unreachable(format!("{addr}: {e}")))?;
            if reply.starts_with("err") || reply.starts_with("ERR") {
                Err(PowerError::Refused {
                    action: action.into(),
                    detail: reply,
                })
            } else {
                Ok(reply)
            }
        }
    }
}

async fn line_exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: S,
    line: &str,
) -> std::io::Result<String> {
    let mut s = BufReader::new(s);
    s.get_mut().write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_line(&mut reply))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s")
        })??;
    Ok(reply.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_hook_substitutes_and_reports_failure() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("log");
        let p = PowerConfig::Command {
            command: format!("echo {{board}}:{{action}} >> {}", f.display()),
            min_off_ms: 0,
        };
        act(&p, "b0", "off").await.unwrap();
        act(&p, "b0", "on").await.unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "b0:off\nb0:on\n");
        let bad = PowerConfig::Command {
            command: "exit 3".into(),
            min_off_ms: 0,
        };
        let e = act(&bad, "b0", "on").await.unwrap_err().to_string();
        assert!(e.contains("exit"), "{e}");
    }

    #[tokio::test]
    async fn http_pdu_posts_and_maps_status() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                s2.lock().unwrap().push(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                );
                let body = "done";
                s.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            }
        });
        let p = PowerConfig::Http {
            url: format!("http://{addr}/outlet/{{board}}/{{action}}"),
            min_off_ms: 0,
        };
        assert_eq!(act(&p, "b7", "off").await.unwrap(), "done");
        let e = act(&p, "b7", "on").await.unwrap_err().to_string();
        assert!(e.contains("HTTP 503"), "{e}");
        assert_eq!(seen.lock().unwrap()[0], "POST /outlet/b7/off HTTP/1.1");
        let dead = PowerConfig::Http {
            url: "http://127.0.0.1:1/x".into(),
            min_off_ms: 0,
        };
        assert!(matches!(
            act(&dead, "b7", "on").await,
            Err(PowerError::Unreachable(_))
        ));
    }

    #[tokio::test]
    async fn sim_socket_line_protocol() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            s.get_mut()
                .write_all(format!("ok {}", line).as_bytes())
                .await
                .unwrap();
        });
        let p = PowerConfig::Sim {
            addr,
            min_off_ms: 0,
        };
        assert_eq!(act(&p, "b0", "cycle").await.unwrap(), "ok cycle");
        let p = PowerConfig::Sim {
            addr: "127.0.0.1:1".into(),
            min_off_ms: 0,
        };
        assert!(matches!(
            act(&p, "b0", "on").await,
            Err(PowerError::Unreachable(_))
        ));
    }
}
