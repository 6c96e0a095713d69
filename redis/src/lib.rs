//! skiff's distributed deployment on Redis: the Store (runs, steps, outputs, logs in Streams,
//! the ledger, deliveries, schedule marks, sessions and tokens), the queue (apalis-redis), the
//! change feed (pub/sub) and the worker registry.

pub mod acl;
pub mod queue;
pub mod testing;
pub mod throttle;
pub mod workers;

/// The Redis client library skiff-redis is built on (one version for the whole build).
pub use redis;
pub mod store;
