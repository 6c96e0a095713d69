//! End-to-end tests: the real `skiff` binary, driven through its CLI.

mod runs;
mod support;
mod validate;
