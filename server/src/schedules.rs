//! The schedules loop: wakes at each schedule's next slot (and every second, to see schedules
//! added to the files), lets the [`Scheduler`] fire what is due, and records how late.

use skiff_core::dispatch::Dispatcher;
use skiff_core::schedule::{LOOK_EVERY, Outcome, Scheduler};
use tokio_util::sync::CancellationToken;

use crate::CatalogHandle;

/// Runs until `stop` is cancelled.
pub async fn keep_schedules(
    catalog: CatalogHandle,
    dispatcher: Dispatcher,
    stop: CancellationToken,
) {
    let mut scheduler = Scheduler::new(dispatcher);
    loop {
        let now = chrono::Utc::now();
        let tick = scheduler.tick(&catalog.current(), now).await;
        for f in &tick.fired {
            if let Outcome::Fired { created: true, .. } = f.outcome {
                metrics::histogram!("skiff_schedule_lateness_seconds")
                    .record(f.late.as_seconds_f64().max(0.0));
                tracing::info!(pipeline = %f.pipeline, slot = %f.slot,
                    late_ms = f.late.num_milliseconds(), "scheduled run made");
            }
        }
        let look = chrono::Utc::now() + LOOK_EVERY;
        let wake = tick.next.map_or(look, |n| n.min(look));
        let wait = (wake - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
