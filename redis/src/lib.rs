//! skiff's distributed deployment on Redis: the Store (runs, steps, outputs, logs in Streams,
//! the ledger, deliveries, schedule marks, sessions and tokens), the queue (one list per label
//! set), the change feed (pub/sub), the worker registry and the shared login throttle.

pub mod acl;
mod auth;
mod codec;
mod conn;
mod feed;
pub mod keys;
pub mod queue;
mod store;
pub mod testing;
pub mod throttle;
pub mod workers;

pub use store::{DEFAULT_LOG_CAP, RedisConfig, RedisStore};

/// The Redis client library skiff-redis is built on (one version for the whole build).
pub use redis;
