//! skiff-worker: executes runs. The step runner, process handling, log capture and masking,
//! secrets, and the built-in actions.

pub mod actions;
pub mod logs;
pub mod pool;
mod process;
pub mod record;
pub mod runner;
pub mod secrets;

pub use logs::RunObserver;
pub use runner::{RunOptions, RunOutcome, clean_up_interrupted, execute_run, finish_interrupted};
