//! skiff-worker: executes runs. The step runner, process handling, log capture and masking,
//! secrets, and the built-in actions.

pub mod actions;
mod cgroup;
pub mod isolation;
pub mod logs;
pub mod pool;
mod process;
pub mod reap;
pub mod record;
pub mod runner;
/// Secrets live in skiff-core (the server checks webhook signatures with them too).
pub use skiff_core::secrets;
mod spawn;

pub use cgroup::{
    Mode as TrackingMode, Tracking, TrackingError, release_pool as release_cgroups,
    tracking as process_tracking,
};
pub use logs::RunObserver;
pub use runner::{
    Interruption, RunOptions, RunOutcome, clean_up_interrupted, execute_run, finish_interrupted,
};
