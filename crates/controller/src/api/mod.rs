//! REST API. Bearer tokens from the config carry a role: `read_only` may read
//! everything, `operator` may also submit and control campaigns and set board health.
//! Missing or unknown token: 401. Read-only token on a mutating call: 403.

mod openapi;

use crate::config::Role;
use crate::link::token_eq;
use crate::registry::Health;
use crate::report::export::{self, Format};
use crate::scheduling::Shared;
use crate::store::now_ms;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use std::sync::Arc;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/openapi.json", get(openapi::serve))
        .route("/api/boards", get(boards))
        .route("/api/boards/{id}/health", post(set_health))
        .route("/api/campaigns", get(list).post(submit))
        .route("/api/campaigns/{id}", get(status))
        .route("/api/campaigns/{id}/{action}", post(control))
        .route("/api/campaigns/{id}/report", get(report))
        .route("/api/campaigns/{id}/export", get(export_records))
        .route("/api/incidents", get(incidents))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(crate::link::PATH, get(crate::link::upgrade))
        .with_state(shared)
}

pub fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

#[allow(clippy::result_large_err)] // the error is the response itself, built once
fn auth(shared: &Shared, headers: &HeaderMap, need: Role) -> Result<(), Response> {
    let Some(h) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("missing bearer token"));
    };
    let tok = h
        .to_str()
        .unwrap_or("")
        .strip_prefix("Bearer ")
        .unwrap_or("")
        .trim();
    let Some(u) = shared
        .cfg
        .tokens
        .users
        .iter()
        .find(|u| token_eq(&u.token, tok))
    else {
        return Err(unauthorized("invalid bearer token"));
    };
    if need == Role::Operator && u.role != Role::Operator {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "user {} has a read-only token; this call needs the operator role",
                u.name
            ),
        ));
    }
    Ok(())
}

fn unauthorized(msg: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    {
        let lab = s.lab();
        s.update_board_gauges(&lab);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn boards(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    if let Err(r) = auth(&s, &h, Role::ReadOnly) {
        return r;
    }
    let lab = s.lab();
    let now = now_ms();
    let v: Vec<_> = lab
        .boards
        .values()
        .map(|b| b.view(now, s.cfg.timing.offline_after_ms))
        .collect();
    Json(v).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthBody {
    health: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn set_health(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = auth(&s, &h, Role::Operator) {
        return r;
    }
    let b: HealthBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let Some(health) = Health::parse(&b.health) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown health {:?}", b.health),
        );
    };
    if !matches!(
        health,
        Health::Unknown | Health::Maintenance | Health::Retired
    ) {
        return error(
            StatusCode::BAD_REQUEST,
            "operators set unknown (re-check), maintenance or retired; good comes from a health check",
        );
    }
    let fr = {
        let mut lab = s.lab();
        let Some(board) = lab.boards.get_mut(&id) else {
            return error(StatusCode::NOT_FOUND, format!("no board {id}"));
        };
        board.health = health;
        board.health_reason = b.reason.clone();
        board.failed_recoveries = 0;
        s.metrics.board_bad_alert.with_label_values(&[&id]).set(0);
        board.failed_recoveries
    };
    let _ = s
        .store
        .set_board_health(&id, health.as_str(), b.reason, fr)
        .await;
    if health == Health::Unknown {
        s.start_health_check(id.clone(), true);
    }
    Json(serde_json::json!({"board": id, "health": health.as_str()})).into_response()
}

async fn submit(State(s): State<Arc<Shared>>, h: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = auth(&s, &h, Role::Operator) {
        return r;
    }
    let Ok(yaml) = String::from_utf8(body.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "campaign file is not UTF-8");
    };
    let origin = h
        .get("x-campaign-file")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("campaign.yaml")
        .to_string();
    let models = s.cfg.models_dir.clone();
    let y2 = yaml.clone();
    let compiled =
        tokio::task::spawn_blocking(move || crate::campaign::compile(&origin, &y2, &models)).await;
    let c = match compiled {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (plan, strata, injections, hash) = (
        c.plan.clone(),
        c.strata.clone(),
        c.injections.clone(),
        c.hash.clone(),
    );
    let n = injections.len();
    let ns = strata.len();
    // Stored (list included) before anything runs.
    let id = match s.store.insert_campaign(yaml, c).await {
        Ok(id) => id,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    tracing::info!(campaign = id, name = %plan.name, trials = n, strata = ns, %hash, "campaign submitted");
    s.add_campaign(id, plan, strata, injections);
    (
        StatusCode::CREATED,
        Json(serde_json::json!({"id": id, "hash": hash, "trials": n, "strata": ns})),
    )
        .into_response()
}

async fn list(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    if let Err(r) = auth(&s, &h, Role::ReadOnly) {
        return r;
    }
    let st = s.store.clone();
    match tokio::task::spawn_blocking(move || st.campaigns_blocking()).await {
        Ok(Ok(rows)) => {
            let v: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|c| {
                    let live = s.run_status(c.id);
                    serde_json::json!({
                        "id": c.id, "name": c.name, "hash": c.hash,
                        "state": live.as_ref().and_then(|l| l.get("state").cloned()).unwrap_or(c.state.clone().into()),
                        "trials": c.total, "priority": c.plan.priority, "created_ms": c.created_ms,
                        "done": live.as_ref().and_then(|l| l.get("done").cloned()),
                        "planned": live.as_ref().and_then(|l| l.get("planned").cloned()),
                    })
                })
                .collect();
            Json(v).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn status(State(s): State<Arc<Shared>>, h: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = auth(&s, &h, Role::ReadOnly) {
        return r;
    }
    let st = s.store.clone();
    let row = match tokio::task::spawn_blocking(move || st.campaign_blocking(id)).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return error(StatusCode::NOT_FOUND, format!("no campaign {id}")),
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let live = s.run_status(id);
    Json(serde_json::json!({
        "id": row.id, "name": row.name, "hash": row.hash, "stored_state": row.state,
        "trials": row.total, "created_ms": row.created_ms, "started_ms": row.started_ms,
        "finished_ms": row.finished_ms, "plan": row.plan, "live": live,
        "state": live.as_ref().and_then(|l| l.get("state").cloned()).unwrap_or(row.state.into()),
    }))
    .into_response()
}

async fn control(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path((id, action)): Path<(u64, String)>,
) -> Response {
    if !matches!(action.as_str(), "pause" | "resume" | "cancel") {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown action {action:?} (pause, resume, cancel)"),
        );
    }
    if let Err(r) = auth(&s, &h, Role::Operator) {
        return r;
    }
    match s.set_run_state(id, &action) {
        Ok(st) => Json(serde_json::json!({"id": id, "state": st.as_str()})).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

#[derive(Deserialize)]
struct FormatQuery {
    #[serde(default)]
    format: Option<String>,
}

async fn report(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<FormatQuery>,
) -> Response {
    if let Err(r) = auth(&s, &h, Role::ReadOnly) {
        return r;
    }
    let fmt = q.format.unwrap_or_else(|| "json".into());
    if !matches!(fmt.as_str(), "json" | "csv" | "table") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown format {fmt:?} (json, csv, table)"),
        );
    }
    let st = s.store.clone();
    let max = s.cfg.timing.max_attempts;
    let r = match tokio::task::spawn_blocking(move || crate::report::build(&st, id, max)).await {
        Ok(Ok(r)) => r,
        Ok(Err(crate::store::StoreError::Data(m))) => return error(StatusCode::NOT_FOUND, m),
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match fmt.as_str() {
        "csv" => ([(header::CONTENT_TYPE, "text/csv")], r.to_csv()).into_response(),
        "table" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            r.to_table(),
        )
            .into_response(),
        _ => Json(r).into_response(),
    }
}

async fn export_records(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<FormatQuery>,
) -> Response {
    if let Err(r) = auth(&s, &h, Role::ReadOnly) {
        return r;
    }
    let f = q.format.unwrap_or_else(|| "csv".into());
    let Some(fmt) = Format::parse(&f) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown format {f:?} (csv, jsonl, parquet)"),
        );
    };
    let st = s.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        if st.campaign_blocking(id)?.is_none() {
            return Err(export::ExportError::Store(crate::store::StoreError::Data(
                format!("no campaign {id}"),
            )));
        }
        let mut buf = Vec::new();
        export::export(&st, id, fmt, &mut buf)?;
        Ok(buf)
    })
    .await;
    match res {
        Ok(Ok(buf)) => ([(header::CONTENT_TYPE, fmt.content_type())], buf).into_response(),
        Ok(Err(export::ExportError::Store(crate::store::StoreError::Data(m)))) => {
            error(StatusCode::NOT_FOUND, m)
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn incidents(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    if let Err(r) = auth(&s, &h, Role::ReadOnly) {
        return r;
    }
    let st = s.store.clone();
    match tokio::task::spawn_blocking(move || st.incidents_blocking()).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
