//! skiff-core: the domain. Pipelines and their loader, expressions, runs and their states, the
//! Store and its SQLite backend. Knows nothing of HTTP, Docker or AWS.

pub mod actions;
pub mod catalog;
pub mod config;
pub mod diag;
pub mod dispatch;
pub mod duration;
pub mod expr;
pub mod glob;
pub mod kv;
pub mod ledger;
pub mod pipeline;
pub mod queue;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod secrets;
pub mod store;
pub mod utf8;
pub mod webhook;
pub mod yaml;
