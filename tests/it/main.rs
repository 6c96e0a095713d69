//! End-to-end tests: the real `skiff` binary, driven through its CLI and its HTTP API.

mod api;
mod auth;
mod browser;
mod distributed;
mod docker;
mod edge;
mod git;
mod harness;
mod hooks;
mod isolation;
mod model;
mod quickstart;
mod records;
mod runs;
mod schedules;
mod tracking;
mod ui;
mod validate;
