//! The OpenAPI 3.0 description of the REST API, served at /api/openapi.json.

use axum::Json;
use serde_json::{Value, json};

fn op(summary: &str, role: &str, params: Value, body: Option<Value>, ok: Value) -> Value {
    let mut o = json!({
        "summary": summary,
        "description": format!("Requires a bearer token with role `{role}`."),
        "security": [{"bearer": []}],
        "parameters": params,
        "responses": {
            "200": ok,
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "403": {"$ref": "#/components/responses/Forbidden"}
        }
    });
    if let Some(b) = body {
        o["requestBody"] = b;
    }
    o
}

fn id_param() -> Value {
    json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}])
}

pub fn document() -> Value {
    let json_ok = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    let fmt = |vals: &[&str]| json!({"name": "format", "in": "query", "required": false, "schema": {"type": "string", "enum": vals}});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "KV260 robustness lab controller", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Campaigns, boards, reports and exports. Agents use the websocket at /v1/agent (proto v1, see docs/protocol.md)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Unauthorized": {"description": "missing or invalid bearer token", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "Forbidden": {"description": "read-only token on a mutating call", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            },
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}
        },
        "paths": {
            "/api/boards": {"get": op("Boards with connectivity, scheduling state and health", "read_only", json!([]), None, json_ok("board list"))},
            "/api/boards/{id}/health": {"post": op("Set a board's health (unknown = re-check, maintenance, retired)", "operator", id_param(),
                Some(json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "properties": {"health": {"type": "string", "enum": ["unknown", "maintenance", "retired"]}, "reason": {"type": "string"}}, "required": ["health"]}}}})),
                json_ok("new health"))},
            "/api/campaigns": {
                "get": op("Campaigns with state and progress", "read_only", json!([]), None, json_ok("campaign list")),
                "post": op("Submit a campaign file (YAML body); it is compiled and stored before it runs", "operator",
                    json!([{"name": "x-campaign-file", "in": "header", "required": false, "schema": {"type": "string"}, "description": "file name used in error messages"}]),
                    Some(json!({"required": true, "content": {"application/yaml": {"schema": {"type": "string"}}}})),
                    json!({"description": "400 on invalid files (error names line and field); 201 with id, hash, trials, strata"}))
            },
            "/api/campaigns/{id}": {"get": op("Campaign status and live progress", "read_only", id_param(), None, json_ok("status"))},
            "/api/campaigns/{id}/pause": {"post": op("Pause (running trials finish, no new ones)", "operator", id_param(), None, json_ok("new state"))},
            "/api/campaigns/{id}/resume": {"post": op("Resume a paused campaign", "operator", id_param(), None, json_ok("new state"))},
            "/api/campaigns/{id}/cancel": {"post": op("Cancel", "operator", id_param(), None, json_ok("new state"))},
            "/api/campaigns/{id}/report": {"get": op("Per-stratum trials, failures, failure rate with Wilson 95% interval, outcome breakdown", "read_only",
                json!([id_param()[0].clone(), fmt(&["json", "csv", "table"])]), None, json_ok("report"))},
            "/api/campaigns/{id}/export": {"get": op("Per-inference records", "read_only",
                json!([id_param()[0].clone(), fmt(&["csv", "jsonl", "parquet"])]), None,
                json!({"description": "records", "content": {"text/csv": {}, "application/x-ndjson": {}, "application/vnd.apache.parquet": {}}}))},
            "/api/incidents": {"get": op("Recovery incidents with post-mortem bundle paths", "read_only", json!([]), None, json_ok("incidents"))},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "text exposition format"}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "ok"}}}}
        }
    })
}

pub async fn serve() -> Json<Value> {
    Json(document())
}
