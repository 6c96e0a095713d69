//! Retention: finished runs are deleted, with their logs, once they are older than a pipeline's
//! `retention.max_age` or beyond its newest `retention.max_runs`; a pipeline that does not say
//! (or whose file is gone) gets the server's defaults.

use std::time::Duration;

use crate::store::{Prune, Store, StoreError};

/// How long finished runs are kept, and how many of a pipeline's; `None` keeps without limit
/// (a pipeline's `retention:`, or the server's defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Finished runs older than this are deleted.
    pub max_age: Option<Duration>,
    /// At most this many finished runs are kept.
    pub max_runs: Option<u32>,
}

impl Retention {
    /// The shortest `max_age` a pipeline file may set.
    pub const MIN_AGE: Duration = Duration::from_secs(3600);
    /// The longest `max_age` a pipeline file may set (about ten years).
    pub const MAX_AGE: Duration = Duration::from_secs(3650 * 24 * 3600);

    /// This policy's limits where it sets them, `defaults` elsewhere.
    pub fn or(self, defaults: Retention) -> Retention {
        Retention {
            max_age: self.max_age.or(defaults.max_age),
            max_runs: self.max_runs.or(defaults.max_runs),
        }
    }
}

/// How often the server applies retention.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Applies retention once to every pipeline with runs in the Store; `policy` gives a pipeline's
/// own retention (its file's `retention:`), if it has one. Returns how many runs were deleted.
pub async fn sweep(
    store: &dyn Store,
    defaults: Retention,
    policy: &(dyn Fn(&str) -> Option<Retention> + Send + Sync),
) -> Result<usize, StoreError> {
    let now = chrono::Utc::now();
    let mut deleted = 0;
    for pipeline in store.pipelines_with_runs().await? {
        let keep = policy(&pipeline).map_or(defaults, |own| own.or(defaults));
        if keep.max_age.is_none() && keep.max_runs.is_none() {
            continue;
        }
        let finished_before = keep
            .max_age
            .and_then(|age| chrono::Duration::from_std(age).ok())
            .and_then(|age| now.checked_sub_signed(age));
        let gone = store
            .prune_runs(&Prune {
                pipeline: pipeline.clone(),
                finished_before,
                keep_last: keep.max_runs,
            })
            .await?;
        if !gone.is_empty() {
            tracing::info!(pipeline = %pipeline, runs = gone.len(), "retention deleted runs");
        }
        deleted += gone.len();
    }
    Ok(deleted)
}
