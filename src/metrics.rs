//! The Prometheus recorder for `/metrics`, and the description of every metric skiff records.

use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets for the time from a run's push to a worker taking it: quarter milliseconds around
/// an idle worker's 1 ms (the queue hop's target is 1.2 ms), up to hours (a backlog). A
/// schedule's lateness uses them too (its target: under 100 ms).
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];
/// Buckets for a step's duration: half a millisecond (`true`) up to the 6 h run timeout.
const STEP_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// Installs the process-wide recorder and its upkeep task, and describes every metric. The
/// durations are histograms, not summaries: buckets add up across servers, and a summary's
/// quantiles fell to 0 once its window had no samples.
pub fn install() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("skiff_queue_wait_seconds".into()),
            QUEUE_WAIT_BUCKETS,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("skiff_step_duration_seconds".into()),
            STEP_DURATION_BUCKETS,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("skiff_schedule_lateness_seconds".into()),
            QUEUE_WAIT_BUCKETS,
        )
        .ok()?
        .install_recorder()
        .ok()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

/// HELP text (and unit) for every metric: `promtool check metrics` refuses metrics without.
fn describe() {
    // Set by the server at each scrape (server/src/api.rs).
    metrics::describe_gauge!("skiff_runs", Unit::Count, "Runs in the Store, by status.");
    metrics::describe_gauge!(
        "skiff_queue_depth",
        Unit::Count,
        "Runs waiting for a worker (status queued)."
    );
    // Recorded by the workers (worker/src/pool.rs).
    metrics::describe_counter!(
        "skiff_runs_finished_total",
        Unit::Count,
        "Runs a worker of this process finished, by final status."
    );
    metrics::describe_histogram!(
        "skiff_step_duration_seconds",
        Unit::Seconds,
        "How long steps took, from start to end, by final status."
    );
    metrics::describe_histogram!(
        "skiff_queue_wait_seconds",
        Unit::Seconds,
        "Time from a run's job being made (embedded: with the run, in its transaction) to a worker taking it."
    );
    // Recorded by the webhooks endpoint (server/src/hooks.rs).
    metrics::describe_counter!(
        "skiff_webhook_deliveries_total",
        Unit::Count,
        "Webhook deliveries received, by outcome (started, skipped, failed, refused)."
    );
    // Recorded by the schedules loop (server/src/schedules.rs).
    metrics::describe_histogram!(
        "skiff_schedule_lateness_seconds",
        Unit::Seconds,
        "Time from a schedule's slot to its run made and its job pushed."
    );
    // Recorded by the login form (server/src/ui.rs).
    metrics::describe_counter!(
        "skiff_login_failures_total",
        Unit::Count,
        "Wrong passwords given to the login form."
    );
    metrics::describe_counter!(
        "skiff_login_refused_total",
        Unit::Count,
        "Password logins refused unchecked after too many wrong passwords."
    );
}
