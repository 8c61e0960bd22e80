//! The websocket endpoint agents dial into (`/v1/agent`, ws or wss).
//!
//! One task reads frames, one writes them. Every frame is decoded with
//! `proto::wire` (which never panics); a frame that does not decode closes the session
//! with a close code and a reason naming what was wrong. Nothing is lost by that:
//! records are acknowledged only after they are committed, so the agent re-sends
//! whatever was not acked when it reconnects.

pub mod tls;

use crate::registry::Session;
use crate::scheduling::Shared;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use proto::wire::{
    AgentMsg, ControllerMsg, DecodeError, MAX_FRAME_BYTES, PROTO_MIN_VERSION, PROTO_VERSION,
    Welcome,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const PATH: &str = "/v1/agent";

/// Close codes (RFC 6455).
const CLOSE_POLICY: u16 = 1008;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_INVALID: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

/// Byte-wise comparison whose time does not depend on where the first difference is.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // The bearer on the upgrade is optional (Hello.token is authoritative), but a
    // wrong one is refused before the upgrade.
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let tok = v
            .to_str()
            .unwrap_or("")
            .strip_prefix("Bearer ")
            .unwrap_or("");
        if !shared.cfg.tokens.boards.values().any(|t| token_eq(t, tok)) {
            shared
                .metrics
                .ws_rejected
                .with_label_values(&["bad_token"])
                .inc();
            return (StatusCode::UNAUTHORIZED, "invalid board token").into_response();
        }
    }
    // Allow frames somewhat above the protocol limit through the websocket layer so
    // they reach our own check and get a named error instead of a bare reset.
    // Small per-connection buffers: a thousand idle agents must stay cheap (the read
    // buffer grows on demand for large record batches).
    ws.read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(MAX_FRAME_BYTES + (1 << 20))
        .max_frame_size(MAX_FRAME_BYTES + (1 << 20))
        .on_upgrade(move |socket| session(shared, socket))
}

async fn close(ws: &mut WebSocket, code: u16, reason: String) {
    let reason: String = reason.chars().take(120).collect();
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

fn decode_reason(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge(_) => "oversized",
        DecodeError::Empty => "empty",
        DecodeError::Malformed(_) => "malformed",
        DecodeError::Trailing(_) => "trailing",
    }
}

async fn refuse(shared: &Shared, ws: &mut WebSocket, why: &'static str, reason: String) {
    tracing::warn!(%reason, "agent refused");
    shared.metrics.ws_rejected.with_label_values(&[why]).inc();
    let _ = ws
        .send(Message::Binary(
            ControllerMsg::Refused {
                reason: reason.clone(),
            }
            .encode()
            .into(),
        ))
        .await;
    close(ws, CLOSE_POLICY, reason).await;
}

async fn session(shared: Arc<Shared>, mut ws: WebSocket) {
    // 1. Hello, within a bounded time.
    let first = tokio::time::timeout(Duration::from_secs(10), ws.recv()).await;
    let hello = match first {
        Ok(Some(Ok(Message::Binary(b)))) => match AgentMsg::decode(&b) {
            Ok(AgentMsg::Hello(h)) => h,
            Ok(_) => {
                return refuse(
                    &shared,
                    &mut ws,
                    "no_hello",
                    "first frame must be Hello".into(),
                )
                .await;
            }
            Err(e) => {
                shared
                    .metrics
                    .ws_rejected
                    .with_label_values(&[decode_reason(&e)])
                    .inc();
                let code = if matches!(e, DecodeError::TooLarge(_)) {
                    CLOSE_TOO_BIG
                } else {
                    CLOSE_INVALID
                };
                return close(&mut ws, code, format!("undecodable frame: {e}")).await;
            }
        },
        Ok(Some(Ok(Message::Text(_)))) => {
            shared
                .metrics
                .ws_rejected
                .with_label_values(&["text_frame"])
                .inc();
            return close(
                &mut ws,
                CLOSE_UNSUPPORTED,
                "text frames are not part of proto v1".into(),
            )
            .await;
        }
        _ => return refuse(&shared, &mut ws, "no_hello", "no Hello within 10 s".into()).await,
    };
    let board = hello.board_id.clone();
    let expected = shared.cfg.tokens.boards.get(&board);
    if !expected.is_some_and(|t| token_eq(t, &hello.token)) {
        return refuse(
            &shared,
            &mut ws,
            "bad_token",
            format!("unknown board {board:?} or wrong token"),
        )
        .await;
    }
    let version = match proto::wire::negotiate_version(
        (PROTO_VERSION, PROTO_MIN_VERSION),
        (hello.proto_version, hello.proto_min_version),
    ) {
        Ok(v) => v,
        Err(e) => return refuse(&shared, &mut ws, "version", e).await,
    };
    let features = proto::wire::common_features(proto::wire::features::ALL_V1, &hello.features);
    let sid = shared.session_seq.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<ControllerMsg>();
    let sess = Session {
        id: sid,
        tx: tx.clone(),
        features: features.clone(),
        active_job_at_hello: hello.active_job,
        spool_head_at_hello: hello.spool_head,
    };
    tracing::info!(board = %board, session = sid, agent = %hello.agent_version, spool_head = hello.spool_head, active_job = ?hello.active_job, "agent connected");
    // Welcome goes first: queue it before the scheduler can queue jobs.
    let committed = shared
        .lab()
        .boards
        .get(&board)
        .map(|b| b.committed_upto)
        .unwrap_or(0);
    let _ = tx.send(ControllerMsg::Welcome(Welcome {
        proto_version: version,
        features,
        heartbeat_ms: shared.cfg.timing.heartbeat_ms,
        committed_upto: committed,
    }));
    shared.on_hello(
        &board,
        sess,
        hello.capabilities.clone(),
        hello.agent_version.clone(),
    );
    shared.metrics.agents_connected.inc();

    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, ControllerMsg::Refused { .. });
            if sink.send(Message::Binary(m.encode().into())).await.is_err() {
                break;
            }
            if close {
                break;
            }
        }
        sink
    });

    let mut close_reason: Option<(u16, String)> = None;
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(board, error = %e, "websocket error");
                shared
                    .metrics
                    .ws_rejected
                    .with_label_values(&["ws_error"])
                    .inc();
                break;
            }
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Text(_) => {
                shared
                    .metrics
                    .ws_rejected
                    .with_label_values(&["text_frame"])
                    .inc();
                close_reason = Some((
                    CLOSE_UNSUPPORTED,
                    "text frames are not part of proto v1".into(),
                ));
                break;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let m = match AgentMsg::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(board, error = %e, "undecodable frame; closing the session");
                shared
                    .metrics
                    .ws_rejected
                    .with_label_values(&[decode_reason(&e)])
                    .inc();
                let code = if matches!(e, DecodeError::TooLarge(_)) {
                    CLOSE_TOO_BIG
                } else {
                    CLOSE_INVALID
                };
                close_reason = Some((code, format!("undecodable frame: {e}")));
                break;
            }
        };
        shared.on_seen(&board);
        match m {
            AgentMsg::Heartbeat { seq, .. } => {
                let _ = tx.send(ControllerMsg::HeartbeatAck { seq });
            }
            AgentMsg::Records(batch) => {
                let t0 = Instant::now();
                let upto = batch.records.iter().map(|r| r.seq).max().unwrap_or(0);
                // Health-check inferences are verdicts, not results: not stored.
                let (health, keep): (Vec<_>, Vec<_>) =
                    batch.records.into_iter().partition(|r| r.campaign_id == 0);
                match shared.store.ingest(&board, keep.clone(), upto).await {
                    Ok(new) => {
                        if upto > 0 {
                            let _ = tx.send(ControllerMsg::Ack { upto });
                        }
                        {
                            let mut lab = shared.lab();
                            if let Some(b) = lab.boards.get_mut(&board) {
                                b.committed_upto = b.committed_upto.max(upto);
                            }
                        }
                        let n_new = new.iter().filter(|n| **n).count();
                        shared.metrics.ingest_records.inc_by(keep.len() as u64);
                        shared
                            .metrics
                            .ingest_duplicates
                            .inc_by((keep.len() - n_new) as u64);
                        let mut fresh: Vec<&proto::wire::Record> = keep
                            .iter()
                            .zip(&new)
                            .filter(|(_, n)| **n)
                            .map(|(r, _)| r)
                            .collect();
                        fresh.extend(health.iter());
                        if !fresh.is_empty() {
                            shared.on_records(&board, &fresh);
                        }
                        shared
                            .metrics
                            .ingest_batch_seconds
                            .with_label_values::<&str>(&[])
                            .observe(t0.elapsed().as_secs_f64());
                    }
                    Err(e) => {
                        // Not acked: the agent keeps the records and re-sends them.
                        tracing::error!(board, error = %e, "ingest failed; closing so the agent re-sends");
                        close_reason = Some((1011, format!("store error: {e}")));
                        break;
                    }
                }
            }
            AgentMsg::Telemetry(t) => on_telemetry(&shared, &board, t),
            AgentMsg::JobState(js) => {
                tracing::info!(board, job = js.job_id, state = ?js.state, detail = ?js.detail, "job state");
                // An agent clears a finished job only once an ack covers its last
                // record; those may all be acked already, so repeat the ack.
                if matches!(
                    js.state,
                    proto::wire::JobPhase::Finished
                        | proto::wire::JobPhase::Cancelled
                        | proto::wire::JobPhase::Failed
                        | proto::wire::JobPhase::Suspect
                ) {
                    let upto = shared
                        .lab()
                        .boards
                        .get(&board)
                        .map(|b| b.committed_upto)
                        .unwrap_or(0);
                    if upto > 0 {
                        let _ = tx.send(ControllerMsg::Ack { upto });
                    }
                }
                shared.on_job_state(&board, &js);
            }
            AgentMsg::Hello(_) => {
                shared
                    .metrics
                    .ws_rejected
                    .with_label_values(&["second_hello"])
                    .inc();
                close_reason = Some((CLOSE_POLICY, "Hello sent twice".into()));
                break;
            }
        }
    }
    drop(tx);
    shared.metrics.agents_connected.dec();
    shared.on_disconnect(&board, sid);
    if let Ok(mut sink) = writer.await
        && let Some((code, reason)) = close_reason
    {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    tracing::info!(board, session = sid, "agent disconnected");
}

fn on_telemetry(shared: &Shared, board: &str, t: proto::wire::Telemetry) {
    let m = &shared.metrics;
    if t.power_w.is_finite() {
        m.power_watts
            .with_label_values(&[board])
            .set(t.power_w as f64);
    }
    // Rail and sensor names come from the board file (a handful per board); cap them
    // anyway so a misbehaving agent cannot blow up the label space.
    for (rail, mv) in t.rails_mv.iter().take(16) {
        if rail.len() <= 32 && mv.is_finite() {
            // Base units: volts.
            m.rail_volts
                .with_label_values(&[board, rail])
                .set(*mv as f64 / 1000.0);
        }
    }
    for (s, c) in t.temps_c.iter().take(16) {
        if s.len() <= 32 && c.is_finite() {
            m.temperature_celsius
                .with_label_values(&[board, s])
                .set(*c as f64);
        }
    }
    let summary = {
        let mut lab = shared.lab();
        let Some(b) = lab.boards.get_mut(board) else {
            return;
        };
        let prev = b.last_telemetry.replace(t.clone());
        prev.filter(|p| p.unix_ms / 60_000 != t.unix_ms / 60_000)
    };
    // Once a minute, a summary row (first and last sample of the minute are enough
    // for trend panels; per-inference values are in the records).
    if let Some(p) = summary {
        let store = shared.store.clone();
        let board = board.to_string();
        let vcc = p
            .rails_mv
            .iter()
            .find(|(r, _)| r == "vccint")
            .map(|(_, v)| *v as f64)
            .unwrap_or(0.0);
        let s = crate::store::TelemetrySummary {
            samples: 1,
            power_sum: p.power_w as f64,
            power_max: p.power_w as f64,
            temp_max: p
                .temps_c
                .iter()
                .map(|(_, c)| *c as f64)
                .fold(f64::MIN, f64::max),
            vccint_min: vcc,
            vccint_max: vcc,
        };
        tokio::spawn(async move {
            let _ = store
                .telemetry_summary(&board, p.unix_ms / 60_000 * 60_000, s)
                .await;
        });
    }
}
