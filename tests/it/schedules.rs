//! Schedules against the real server: a line with seconds fires each slot once, on time and not
//! early, through a clean stop and a crash of the server on the same data.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::harness::*;

const EVERY_2S: &str = "on:\n  manual: false\n  schedule:\n    - cron: \"*/2 * * * * *\"\n      params: { who: clock }\nparams:\n  who: { default: nobody }\nsteps:\n  - run: echo \"tick for $SKIFF_PARAM_WHO\"\n";

fn runs(s: &Server) -> Vec<Value> {
    let (status, list) = s.api("GET", "/api/runs?pipeline=ticker&limit=500", None);
    assert_eq!(status, 200, "{list}");
    list["runs"].as_array().expect("runs").clone()
}

fn wait_for_runs(s: &Server, n: usize) {
    eventually(&format!("{n} scheduled runs"), || runs(s).len() >= n);
}

/// The slot a scheduled run names (`... slot 2026-12-03T10:00:02Z`).
fn slot(run: &Value) -> DateTime<Utc> {
    let actor = run["trigger"]["actor"].as_str().expect("actor");
    let at = actor.rsplit("slot ").next().expect("a slot");
    DateTime::parse_from_rfc3339(at)
        .unwrap_or_else(|e| panic!("{actor}: {e}"))
        .with_timezone(&Utc)
}

#[test]
fn a_schedule_fires_each_slot_once_across_a_stop_and_a_crash() {
    let s = Server::start(&[("ticker", EVERY_2S)]);
    let (status, p) = s.api("GET", "/api/pipelines/ticker", None);
    assert_eq!(status, 200, "{p}");
    let sched = &p["triggers"]["schedules"][0];
    assert_eq!(sched["cron"], "*/2 * * * * *", "{p}");
    assert_eq!(sched["missed"], "skip", "{p}");
    let next: Vec<DateTime<Utc>> = sched["next"]
        .as_array()
        .expect("next")
        .iter()
        .map(|t| t.as_str().expect("a time").parse().expect("RFC 3339"))
        .collect();
    assert_eq!(next.len(), 5, "{p}");
    for w in next.windows(2) {
        assert_eq!((w[1] - w[0]).num_seconds(), 2, "{next:?}");
    }
    // Manual runs are off: only the schedule starts it.
    let (status, body) = s.api("POST", "/api/pipelines/ticker/runs", Some("{}"));
    assert_eq!(status, 409, "{body}");

    wait_for_runs(&s, 3);
    let mut s = s;
    s.stop();
    let s = s.restart();
    let before = runs(&s).len();
    wait_for_runs(&s, before + 2);
    let mut s = s;
    s.crash();
    let s = s.restart();
    let before = runs(&s).len();
    wait_for_runs(&s, before + 2);

    let all = runs(&s);
    let mut slots = BTreeSet::new();
    for run in &all {
        assert_eq!(run["trigger"]["kind"], "schedule", "{run}");
        assert_eq!(run["params"]["who"], "clock", "{run}");
        let at = slot(run);
        assert_eq!(at.timestamp() % 2, 0, "a slot of the line: {at}");
        assert_eq!(at.timestamp_subsec_nanos(), 0, "{at}");
        let created: DateTime<Utc> = run["created_at"]
            .as_str()
            .expect("created_at")
            .parse()
            .expect("RFC 3339");
        assert!(created >= at, "never early: made {created} for {at}");
        assert!(slots.insert(at), "slot {at} fired twice: {all:#?}");
    }
    // Every run ends, and says what its schedule passed it.
    let newest = all[0]["id"].as_str().expect("id").to_string();
    let run = s.wait_for_end(&newest);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(s.log_text(&newest).contains("tick for clock"));
}
