//! End-to-end tests: the real `skiff` binary, driven through its CLI and its HTTP API.

mod api;
mod browser;
mod edge;
mod model;
mod quickstart;
mod records;
mod runs;
mod server;
mod support;
mod tracking;
mod validate;
