//! Where skiff keeps its data in Redis. Every key is under `skiff:`, in three parts that Redis
//! ACLs can tell apart by prefix:
//!
//! - `skiff:auth:*`: credentials, read and written by servers only: the admin password's hash
//!   (`skiff:auth:admin`), API tokens (`skiff:auth:token:{id}`, `skiff:auth:tokens` by time,
//!   `skiff:auth:token_by_hash`), UI sessions (`skiff:auth:session:{hash}`, expiring by
//!   themselves, named in `skiff:auth:sessions`), one-time login links
//!   (`skiff:auth:link:{hash}`), and later the login throttle.
//! - `skiff:d:*`: everything a worker may touch: runs (`skiff:d:run:{id}`, a hash), their steps
//!   (`skiff:d:run:{id}:steps`: `p:{index}` the plan, `s:{index}` the state, JSON), their log
//!   (`skiff:d:run:{id}:log`, a stream: one entry per chunk, its ID `{offset}-1`), the run
//!   indexes (`skiff:d:runs`, `skiff:d:runs:p:{pipeline}`, `skiff:d:runs:s:{status}`,
//!   `skiff:d:runs:ps:{pipeline}:{status}`: sorted sets scored by creation order), the counters
//!   (`skiff:d:seq`, `skiff:d:numbers`: each pipeline's last number, never lowered), the
//!   idempotency keys (`skiff:d:idem:{pipeline}`), `skiff:d:pipelines`, the resources ledger
//!   (`skiff:d:res:k:{id}`, `skiff:d:res:all`, `skiff:d:res:run:{run}`,
//!   `skiff:d:res:svc:{service}`), and the change channel (`skiff:d:changes`, pub/sub).
//! - `skiff:s:*`: the server's own: webhook deliveries (`skiff:s:dlv:k:{key}`, indexed by time
//!   in `skiff:s:dlv:time`, by hook in `skiff:s:dlv:hook:{hook}`, by the provider's delivery id
//!   in `skiff:s:dlv:id:{id}`) and schedule marks (`skiff:s:sched:{key}`).
//!
//! Workers get an ACL user limited to `~skiff:d:*` (keys) and `&skiff:d:*` (channels), so a
//! worker, which runs untrusted builds, can never read sessions, tokens or deliveries. The Lua
//! scripts take the record they work on in `KEYS` and derive the indexes they keep from the
//! prefixes above (a single Redis, no cluster).
//!
//! Every record (a hash, a JSON value, a log stream's entry) carries its schema version, `v`
//! (now 1); indexes and counters are derived from them.

use skiff_core::run::RunId;

pub const DATA: &str = "skiff:d:";
pub const AUTH: &str = "skiff:auth:";
pub const SERVER: &str = "skiff:s:";

/// The change channel.
pub const CHANGES: &str = "skiff:d:changes";

pub fn run(id: &RunId) -> String {
    format!("{DATA}run:{id}")
}

pub fn steps(id: &RunId) -> String {
    format!("{DATA}run:{id}:steps")
}

pub fn log(id: &RunId) -> String {
    format!("{DATA}run:{id}:log")
}

pub const ALL_RUNS: &str = "skiff:d:runs";
pub const PIPELINES: &str = "skiff:d:pipelines";

pub fn runs_of(pipeline: &str) -> String {
    format!("{DATA}runs:p:{pipeline}")
}

pub fn runs_in(status: &str) -> String {
    format!("{DATA}runs:s:{status}")
}

pub fn runs_of_in(pipeline: &str, status: &str) -> String {
    format!("{DATA}runs:ps:{pipeline}:{status}")
}

pub fn resource(id: &str) -> String {
    format!("{DATA}res:k:{id}")
}

pub const ALL_RESOURCES: &str = "skiff:d:res:all";

pub fn resources_of_run(run: &RunId) -> String {
    format!("{DATA}res:run:{run}")
}

pub fn resources_of_service(service: &str) -> String {
    format!("{DATA}res:svc:{service}")
}

pub fn delivery(key: &str) -> String {
    format!("{SERVER}dlv:k:{key}")
}

pub const DELIVERIES: &str = "skiff:s:dlv:time";

pub fn deliveries_of_hook(hook: &str) -> String {
    format!("{SERVER}dlv:hook:{hook}")
}

pub fn deliveries_with_id(id: &str) -> String {
    format!("{SERVER}dlv:id:{id}")
}

pub fn schedule(key: &str) -> String {
    format!("{SERVER}sched:{key}")
}

pub const ADMIN: &str = "skiff:auth:admin";
pub const TOKENS: &str = "skiff:auth:tokens";

pub fn token(id: &str) -> String {
    format!("{AUTH}token:{id}")
}

pub fn session(hash: &str) -> String {
    format!("{AUTH}session:{hash}")
}

pub fn login_link(hash: &str) -> String {
    format!("{AUTH}link:{hash}")
}
