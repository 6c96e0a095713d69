//! `/api/openapi.json`: the API described for the people and tools that script against it.

use axum::Json;
use serde_json::{Value, json};

use crate::auth::Auth;

pub async fn document(_auth: Auth) -> Json<Value> {
    Json(spec())
}

fn op(summary: &str, params: Value, body: Option<Value>, responses: Value) -> Value {
    let mut o = json!({ "summary": summary, "parameters": params, "responses": responses });
    if let Some(b) = body {
        o["requestBody"] =
            json!({ "required": true, "content": { "application/json": { "schema": b } } });
    }
    o
}

fn path_param(name: &str, what: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": what, "schema": { "type": "string" } })
}

fn query_param(name: &str, what: &str, kind: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": what, "schema": { "type": kind } })
}

fn ok(what: &str, schema: &str) -> Value {
    json!({ "description": what, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn err(what: &str) -> Value {
    json!({ "description": what, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

pub fn spec() -> Value {
    let run_id = path_param("id", "the run's id (a UUID)");
    json!({
        "openapi": "3.1.0",
        "info": { "title": "skiff", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Trigger and follow pipeline runs. Every route but /healthz needs `Authorization: Bearer <token>` or a UI session (with `X-CSRF-Token` on POST)." },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": {
                    "code": { "type": "string" }, "message": { "type": "string" },
                    "fields": { "type": "array", "items": { "type": "object", "properties": { "param": { "type": "string" }, "message": { "type": "string" } } } } } } } },
                "Pipeline": { "type": "object", "properties": {
                    "name": { "type": "string" }, "file": { "type": "string" }, "valid": { "type": "boolean" }, "description": { "type": ["string", "null"] },
                    "diagnostics": { "type": "array", "items": { "type": "object", "properties": { "line": { "type": "integer" }, "column": { "type": "integer" }, "message": { "type": "string" }, "help": { "type": "string" } } } },
                    "params": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "type": { "enum": ["string", "boolean", "number", "choice"] }, "default": { "type": ["string", "null"] }, "description": { "type": ["string", "null"] }, "options": { "type": "array", "items": { "type": "string" } }, "required": { "type": "boolean" } } } },
                    "triggers": { "type": ["object", "null"] }, "steps": { "type": "array", "items": { "type": "object" } } } },
                "PipelineList": { "type": "object", "properties": { "pipelines": { "type": "array", "items": { "$ref": "#/components/schemas/Pipeline" } } } },
                "Step": { "type": "object", "properties": {
                    "index": { "type": "integer" }, "id": { "type": "string" }, "name": { "type": "string" }, "phase": { "enum": ["main", "finally"] },
                    "status": { "enum": ["pending", "running", "succeeded", "failed", "skipped", "cancelled", "timed_out"] },
                    "attempt": { "type": "integer" }, "exit_code": { "type": ["integer", "null"] }, "started_at": { "type": ["string", "null"], "format": "date-time" },
                    "finished_at": { "type": ["string", "null"], "format": "date-time" }, "duration_ms": { "type": ["integer", "null"] }, "reason": { "type": ["string", "null"] },
                    "outputs": { "type": "object", "additionalProperties": { "type": "string" } } } },
                "Run": { "type": "object", "properties": {
                    "id": { "type": "string" }, "pipeline": { "type": "string" }, "number": { "type": "integer" },
                    "status": { "enum": ["queued", "running", "succeeded", "failed", "cancelled", "timed_out"] },
                    "trigger": { "type": "object", "properties": { "kind": { "type": "string" }, "actor": { "type": "string" } } },
                    "params": { "type": "object", "additionalProperties": { "type": "string" } }, "rerun_of": { "type": ["string", "null"] },
                    "created_at": { "type": "string", "format": "date-time" }, "started_at": { "type": ["string", "null"] }, "finished_at": { "type": ["string", "null"] },
                    "duration_ms": { "type": ["integer", "null"] }, "reason": { "type": ["string", "null"] }, "log_len": { "type": "integer" },
                    "cancel_requested": { "type": "boolean" }, "steps": { "type": "array", "items": { "$ref": "#/components/schemas/Step" } } } },
                "RunList": { "type": "object", "properties": { "runs": { "type": "array", "items": { "$ref": "#/components/schemas/Run" } }, "next": { "type": ["string", "null"] } } },
                "Logs": { "type": "object", "properties": {
                    "offset": { "type": "integer" }, "next_offset": { "type": "integer" }, "len": { "type": "integer" }, "complete": { "type": "boolean" },
                    "chunks": { "type": "array", "items": { "type": "object", "properties": { "offset": { "type": "integer" }, "step": { "type": ["integer", "null"] }, "text": { "type": "string" } } } } } },
                "TriggerBody": { "type": "object", "additionalProperties": false, "properties": { "params": { "type": "object", "additionalProperties": { "type": ["string", "number", "boolean"] } } } },
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/healthz": { "get": { "summary": "Liveness (no authentication)", "security": [], "responses": { "200": { "description": "ok" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text exposition format" }, "401": err("not signed in") } } },
            "/api/pipelines": { "get": op("List pipelines, valid and invalid", json!([]), None, json!({ "200": ok("pipelines", "PipelineList"), "401": err("not signed in") })) },
            "/api/pipelines/{name}": { "get": op("Get a pipeline", json!([path_param("name", "the pipeline's name")]), None,
                json!({ "200": ok("the pipeline", "Pipeline"), "404": err("no such pipeline") })) },
            "/api/pipelines/{name}/runs": { "post": op("Trigger a run", json!([path_param("name", "the pipeline's name")]), Some(json!({ "$ref": "#/components/schemas/TriggerBody" })),
                json!({ "201": ok("the new run", "Run"), "400": err("malformed JSON"), "404": err("no such pipeline"), "409": err("the pipeline is invalid or does not allow manual runs"),
                        "413": err("body too large"), "415": err("not JSON"), "422": err("params do not fit (see `fields`)") })) },
            "/api/runs": { "get": op("List runs, newest first", json!([query_param("pipeline", "only this pipeline's runs", "string"), query_param("status", "only runs in this state", "string"),
                query_param("limit", "page size (1-500, default 50)", "integer"), query_param("cursor", "the `next` of the previous page", "string")]), None,
                json!({ "200": ok("a page of runs", "RunList"), "400": err("bad filter") })) },
            "/api/runs/{id}": { "get": op("Get a run with its steps", json!([run_id]), None, json!({ "200": ok("the run", "Run"), "404": err("no such run") })) },
            "/api/runs/{id}/logs": { "get": op("Read a run's log from an offset", json!([run_id, query_param("offset", "byte offset (default 0)", "integer"), query_param("limit", "most bytes (default and max 1 MiB)", "integer")]), None,
                json!({ "200": ok("log chunks", "Logs"), "404": err("no such run"), "416": err("offset past the end") })) },
            "/api/runs/{id}/logs/stream": { "get": op("Follow a run's log live (Server-Sent Events: `log` events whose id is the next offset, `step`, `run`, `end`); resume with Last-Event-ID or ?offset=",
                json!([run_id, query_param("offset", "byte offset to start from", "integer")]), None,
                json!({ "200": { "description": "text/event-stream" }, "404": err("no such run"), "416": err("offset past the end") })) },
            "/api/runs/{id}/cancel": { "post": op("Cancel a run (its finally steps still run)", json!([run_id]), None, json!({ "202": ok("the run", "Run"), "404": err("no such run"), "409": err("the run already ended") })) },
            "/api/runs/{id}/rerun": { "post": op("Run again with the same pipeline snapshot and params", json!([run_id]), None, json!({ "201": ok("the new run", "Run"), "404": err("no such run") })) },
            "/api/tokens": {
                "get": op("List API tokens", json!([]), None, json!({ "200": { "description": "tokens (never their secrets)" } })),
                "post": op("Create an API token (its secret is shown once)", json!([]), Some(json!({ "type": "object", "required": ["name"], "properties": { "name": { "type": "string" } } })),
                    json!({ "201": { "description": "the token, with `token` holding its secret" }, "422": err("bad name") })) },
            "/api/tokens/{id}/revoke": { "post": op("Revoke an API token", json!([path_param("id", "the token's id")]), None, json!({ "204": { "description": "revoked" }, "404": err("no such active token") })) },
        }
    })
}
