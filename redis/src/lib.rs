//! skiff's distributed deployment on Redis: the Store (runs, steps, outputs, logs in Streams,
//! the ledger, deliveries, schedule marks, sessions and tokens), the queue (apalis-redis), the
//! change feed (pub/sub) and the worker registry.

mod auth;
mod codec;
mod feed;
pub mod keys;
mod store;
pub mod testing;

pub use store::{DEFAULT_LOG_CAP, RedisConfig, RedisStore};
