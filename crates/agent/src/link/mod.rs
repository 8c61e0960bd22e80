//! The controller link (proto v1 over a websocket, see docs/protocol.md) and the
//! durable record spool behind it.

pub mod spool;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proto::wire::{self, AgentMsg, Capabilities, ControllerMsg, Hello, RecordBatch, Telemetry};
use rand::Rng;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use crate::board::Sensors;
use crate::config::Config;
use crate::trial::worker::{Cmd, Shared};
use spool::Spool;

/// Records per `Records` frame.
pub const BATCH: usize = 256;
/// Records sent but not yet acked before the link waits for acks.
pub const WINDOW: u64 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: Box<tungstenite::Error>,
    },
    #[error("websocket: {0}")]
    Ws(#[from] Box<tungstenite::Error>),
    #[error("controller refused us: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("controller silent for {0:?}")]
    Silent(Duration),
    #[error("tls: {0}")]
    Tls(String),
    #[error("spool: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("shutting down")]
    Shutdown,
}

pub struct Link {
    pub cfg: Config,
    pub token: String,
    pub capabilities: Capabilities,
    pub spool: Arc<Mutex<Spool>>,
    pub wake: Arc<Notify>,
    pub events: tokio::sync::mpsc::UnboundedReceiver<AgentMsg>,
    pub cmds: std::sync::mpsc::Sender<Cmd>,
    pub shared: Arc<Shared>,
    pub sensors: Option<Sensors>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Exponential backoff, 0.2 s doubling to 10 s, +-25 % jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    let j = rand::rng().random_range(0.75..1.25);
    Duration::from_millis((base as f64 * j) as u64)
}

fn tls_connector(cfg: &Config) -> Result<Option<tokio_tungstenite::Connector>, LinkError> {
    if !cfg.controller_url.starts_with("wss://") {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| LinkError::Tls(format!("{}: {e}", ca.display())))?;
        for c in certs {
            let c = c.map_err(|e| LinkError::Tls(format!("{}: {e}", ca.display())))?;
            roots
                .add(c)
                .map_err(|e| LinkError::Tls(format!("{}: {e}", ca.display())))?;
        }
    }
    // The only crypto provider compiled in is ring (workspace rustls features).
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_tungstenite::Connector::Rustls(Arc::new(config))))
}

impl Link {
    /// Connect, serve, reconnect, until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut attempt = 0u32;
        let mut last_rx = Instant::now();
        let grace = Duration::from_millis(self.cfg.controller_grace_ms);
        loop {
            let session = self.session(&mut last_rx, &mut attempt);
            tokio::select! {
                _ = &mut shutdown => return,
                r = session => match r {
                    Err(LinkError::Shutdown) => return,
                    Err(e) => tracing::warn!(error = %e, "Controller link down"),
                    Ok(()) => tracing::info!("Controller closed the link"),
                },
            }
            // Reconnect with backoff; pause the job if the controller stays away.
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            let deadline = tokio::time::Instant::now() + delay;
            loop {
                if last_rx.elapsed() > grace
                    && !self.shared.paused.load(std::sync::atomic::Ordering::SeqCst)
                {
                    let _ = self.cmds.send(Cmd::Pause);
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                let step = (deadline - now).min(Duration::from_millis(200));
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(step) => {}
                }
                // Drop stale events (JobStates) while offline: final states are re-sent
                // from `Shared` after reconnecting.
                while self.events.try_recv().is_ok() {}
            }
        }
    }

    async fn session(&mut self, last_rx: &mut Instant, attempt: &mut u32) -> Result<(), LinkError> {
        let url = self.cfg.controller_url.clone();
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| LinkError::Connect {
                url: url.clone(),
                source: Box::new(e),
            })?;
        if let Ok(v) = format!("Bearer {}", self.token).parse() {
            req.headers_mut().insert("authorization", v);
        }
        let connector = tls_connector(&self.cfg)?;
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector),
        )
        .await
        .map_err(|_| LinkError::Protocol(format!("connect to {url} timed out")))?
        .map_err(|e| LinkError::Connect {
            url: url.clone(),
            source: Box::new(e),
        })?;
        let head = lock(&self.spool).head();
        let hello = Hello {
            proto_version: wire::PROTO_VERSION,
            proto_min_version: wire::PROTO_MIN_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            board_id: self.cfg.board_id.clone(),
            token: self.token.clone(),
            capabilities: self.capabilities.clone(),
            features: wire::features::ALL_V1
                .iter()
                .map(|s| s.to_string())
                .collect(),
            spool_head: head,
            active_job: *lock(&self.shared.active_job),
        };
        send(&mut ws, &AgentMsg::Hello(hello)).await?;
        let welcome = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .map_err(|_| LinkError::Protocol("no Welcome within 10 s".into()))?;
            match m {
                None => return Err(LinkError::Protocol("closed before Welcome".into())),
                Some(Err(e)) => return Err(Box::new(e).into()),
                Some(Ok(Message::Binary(b))) => match ControllerMsg::decode(&b) {
                    Ok(ControllerMsg::Welcome(w)) => break w,
                    Ok(ControllerMsg::Refused { reason }) => {
                        return Err(LinkError::Refused(reason));
                    }
                    Ok(other) => {
                        return Err(LinkError::Protocol(format!(
                            "expected Welcome, got {other:?}"
                        )));
                    }
                    Err(e) => return Err(LinkError::Protocol(e.to_string())),
                },
                Some(Ok(Message::Close(_))) => {
                    return Err(LinkError::Protocol("closed before Welcome".into()));
                }
                Some(Ok(_)) => {}
            }
        };
        wire::negotiate_version(
            (wire::PROTO_VERSION, wire::PROTO_MIN_VERSION),
            (welcome.proto_version, welcome.proto_version),
        )
        .map_err(LinkError::Protocol)?;
        let telemetry = welcome
            .features
            .iter()
            .any(|f| f == wire::features::TELEMETRY);
        tracing::info!(url = %url, committed = welcome.committed_upto, spool_head = head, "Connected to the controller");
        *attempt = 0;
        *last_rx = Instant::now();
        let _ = self.cmds.send(Cmd::Resume);
        // Read the final state before acking: the ack may let the worker clear the job.
        let final_state = lock(&self.shared.final_state).clone();
        lock(&self.spool).ack(welcome.committed_upto)?;
        let _ = self.cmds.send(Cmd::Acked(welcome.committed_upto));
        let mut sent = welcome.committed_upto;
        let mut acked = welcome.committed_upto;
        if let Some(s) = final_state {
            send(&mut ws, &AgentMsg::JobState(s)).await?;
        }
        let grace = Duration::from_millis(self.cfg.controller_grace_ms);
        let hb_period = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(100)));
        let mut hb = tokio::time::interval(hb_period);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let tel_period = Duration::from_secs_f32(1.0 / self.cfg.telemetry_hz);
        let mut tel = tokio::time::interval(tel_period);
        let mut hb_seq = 0u64;
        let wake = self.wake.clone();
        loop {
            // Send whatever the spool holds beyond what was sent (within the window).
            while sent < lock(&self.spool).head() && sent - acked < WINDOW {
                let recs = lock(&self.spool).read_after(sent, BATCH)?;
                let Some(last) = recs.last().map(|r| r.seq) else {
                    break;
                };
                for chunk in recs.chunks(BATCH) {
                    send(
                        &mut ws,
                        &AgentMsg::Records(RecordBatch {
                            records: chunk.to_vec(),
                        }),
                    )
                    .await?;
                }
                sent = last;
            }
            tokio::select! {
                m = ws.next() => {
                    let m = match m {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(Box::new(e).into()),
                        Some(Ok(m)) => m,
                    };
                    *last_rx = Instant::now();
                    let b = match m {
                        Message::Binary(b) => b,
                        Message::Close(_) => return Ok(()),
                        Message::Text(_) => return Err(LinkError::Protocol("text frame (proto v1 is binary)".into())),
                        _ => continue,
                    };
                    let msg = ControllerMsg::decode(&b).map_err(|e| LinkError::Protocol(e.to_string()))?;
                    match msg {
                        ControllerMsg::HeartbeatAck { .. } | ControllerMsg::Welcome(_) => {}
                        ControllerMsg::Refused { reason } => return Err(LinkError::Refused(reason)),
                        ControllerMsg::Ack { upto } => {
                            if upto > sent {
                                return Err(LinkError::Protocol(format!("ack {upto} beyond the last sent seq {sent}")));
                            }
                            if upto > acked {
                                lock(&self.spool).ack(upto)?;
                                acked = upto;
                                let _ = self.cmds.send(Cmd::Acked(upto));
                            }
                        }
                        ControllerMsg::Job(j) => { let _ = self.cmds.send(Cmd::Job(j)); }
                        ControllerMsg::Trials(t) => { let _ = self.cmds.send(Cmd::Trials(t)); }
                        ControllerMsg::Cancel { job_id } => { let _ = self.cmds.send(Cmd::Cancel(job_id)); }
                    }
                }
                ev = self.events.recv() => {
                    match ev {
                        Some(m) => send(&mut ws, &m).await?,
                        None => return Err(LinkError::Shutdown),
                    }
                }
                _ = wake.notified() => {}
                _ = tick.tick() => {
                    if last_rx.elapsed() > grace {
                        return Err(LinkError::Silent(last_rx.elapsed()));
                    }
                }
                _ = hb.tick() => {
                    hb_seq += 1;
                    send(&mut ws, &AgentMsg::Heartbeat { seq: hb_seq, unix_ms: unix_ms() }).await?;
                }
                _ = tel.tick(), if telemetry && self.sensors.is_some() => {
                    let r = self.sensors.as_mut().expect("guarded").reading();
                    let t = Telemetry {
                        unix_ms: unix_ms(),
                        power_w: r.power_w,
                        current_a: r.current_a,
                        rails_mv: r.rails_mv,
                        temps_c: r.temps_c,
                    };
                    send(&mut ws, &AgentMsg::Telemetry(t)).await?;
                }
            }
        }
    }
}

async fn send<S>(ws: &mut S, m: &AgentMsg) -> Result<(), LinkError>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    ws.send(Message::Binary(m.encode().into()))
        .await
        .map_err(|e| LinkError::Ws(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        for a in 0..20 {
            let d = backoff(a);
            assert!(
                d >= Duration::from_millis(150) && d <= Duration::from_millis(12_500),
                "{a}: {d:?}"
            );
        }
        assert!(backoff(10) > backoff(0));
    }
}
