//! Schedules against a real SQLite Store and queue, with time moved by hand: each slot fires
//! once across restarts and two schedulers, missed slots follow `missed:`, and daylight-saving
//! nights in a real timezone fire what the README promises.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use skiff_core::catalog::Catalog;
use skiff_core::dispatch::Dispatcher;
use skiff_core::queue::SqliteQueue;
use skiff_core::run::{Trigger, TriggerKind};
use skiff_core::schedule::{self, Outcome, Scheduler};
use skiff_core::store::{RunQuery, SqliteStore, Store};

struct World {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    dispatcher: Dispatcher,
    catalog: Catalog,
}

async fn world(pipelines: &[(&str, &str)]) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let pdir = dir.path().join("pipelines");
    std::fs::create_dir(&pdir).expect("mkdir");
    for (name, yaml) in pipelines {
        std::fs::write(pdir.join(format!("{name}.yml")), yaml).expect("write");
    }
    let catalog = Catalog::load(&pdir);
    for e in catalog.entries() {
        assert!(e.is_valid(), "{}: {:?}", e.name, e.diagnostics);
    }
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("skiff.db"))
            .await
            .expect("store"),
    );
    let queue = SqliteQueue::open(store.writer(), 4).await.expect("queue");
    let dispatcher = Dispatcher {
        store: store.clone(),
        queue: Arc::new(queue),
    };
    World {
        _dir: dir,
        store,
        dispatcher,
        catalog,
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("time")
        .with_timezone(&Utc)
}

fn scheduler(w: &World) -> Scheduler {
    // Lateness is not under test here: the clock says each run is made right on its slot.
    Scheduler::with_clock(w.dispatcher.clone(), Arc::new(Utc::now))
}

async fn runs(w: &World, pipeline: &str) -> Vec<skiff_core::run::Run> {
    w.store
        .list_runs(&RunQuery {
            pipeline: Some(pipeline.into()),
            status: None,
            limit: 500,
            cursor: None,
        })
        .await
        .expect("runs")
        .runs
}

/// The slots a scheduler fires (runs it made) while time walks from `from` to `to` by `step`,
/// each tick landing `after` past the step.
async fn walk(
    s: &mut Scheduler,
    w: &World,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: TimeDelta,
) -> Vec<(String, DateTime<Utc>)> {
    let mut fired = Vec::new();
    let mut now = from;
    while now <= to {
        let tick = s.tick(&w.catalog, now).await;
        for f in tick.fired {
            if let Outcome::Fired { created: true, .. } = f.outcome {
                fired.push((f.pipeline, f.slot));
            }
        }
        now += step;
    }
    fired
}

const EVERY_5: &str =
    "on:\n  manual: false\n  schedule: [{ cron: \"*/5 * * * *\" }]\nsteps:\n  - run: echo tick\n";

#[tokio::test]
async fn a_slot_fires_once_on_time_and_not_again_after_a_restart() {
    let w = world(&[("every5", EVERY_5)]).await;
    let mut s = scheduler(&w);
    // First sight: the schedule starts from now; no slot before it fires.
    let first = s.tick(&w.catalog, at("2026-06-01T10:01:00Z")).await;
    assert!(first.fired.is_empty(), "{:?}", first.fired);
    assert_eq!(first.next, Some(at("2026-06-01T10:05:00Z")));
    let early = s.tick(&w.catalog, at("2026-06-01T10:04:59.999Z")).await;
    assert!(early.fired.is_empty());

    let on_time = s.tick(&w.catalog, at("2026-06-01T10:05:00.010Z")).await;
    assert_eq!(on_time.fired.len(), 1, "{:?}", on_time.fired);
    let f = &on_time.fired[0];
    assert_eq!(f.slot, at("2026-06-01T10:05:00Z"));
    assert!(matches!(f.outcome, Outcome::Fired { created: true, .. }));
    assert_eq!(on_time.next, Some(at("2026-06-01T10:10:00Z")));
    // The same instant again, and a restarted server (no memory but the Store's).
    assert!(
        s.tick(&w.catalog, at("2026-06-01T10:05:00.020Z"))
            .await
            .fired
            .is_empty()
    );
    let mut restarted = scheduler(&w);
    let again = restarted.tick(&w.catalog, at("2026-06-01T10:05:30Z")).await;
    assert!(again.fired.is_empty(), "{:?}", again.fired);
    assert_eq!(again.next, Some(at("2026-06-01T10:10:00Z")));

    let made = runs(&w, "every5").await;
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].trigger.kind, TriggerKind::Schedule);
    assert_eq!(
        made[0].trigger.actor,
        "`*/5 * * * *` (UTC), slot 2026-06-01T10:05:00Z"
    );
}

#[tokio::test]
async fn a_run_made_before_a_crash_is_not_made_twice() {
    let w = world(&[("every5", EVERY_5)]).await;
    let mut s = scheduler(&w);
    s.tick(&w.catalog, at("2026-06-01T10:01:00Z")).await;
    // A server made the slot's run and died before moving the mark.
    let entry = w.catalog.get("every5").expect("entry").clone();
    let sched = &entry.pipeline.as_ref().expect("valid").on.schedules[0];
    let key = schedule::key("every5", 0, sched);
    let slot = at("2026-06-01T10:05:00Z");
    let made = w
        .dispatcher
        .trigger_once(
            &entry,
            &Default::default(),
            Trigger {
                kind: TriggerKind::Schedule,
                actor: schedule::actor(sched, slot),
            },
            schedule::slot_key(&key, slot),
        )
        .await
        .expect("made");
    let mut restarted = scheduler(&w);
    let tick = restarted.tick(&w.catalog, at("2026-06-01T10:05:20Z")).await;
    assert_eq!(tick.fired.len(), 1);
    assert_eq!(
        tick.fired[0].outcome,
        Outcome::Fired {
            run: made.run.id.clone(),
            created: false
        }
    );
    assert_eq!(runs(&w, "every5").await.len(), 1);
    assert_eq!(w.store.schedule_mark(&key).await.expect("mark"), Some(slot));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_store_fire_each_slot_once() {
    let w = world(&[(
        "often",
        "on:\n  schedule: [{ cron: \"*/2 * * * * *\" }]\nsteps:\n  - run: echo tick\n",
    )])
    .await;
    let mut a = scheduler(&w);
    let mut b = scheduler(&w);
    let start = at("2026-06-01T10:00:00.500Z");
    let (x, y) = tokio::join!(a.tick(&w.catalog, start), b.tick(&w.catalog, start));
    assert!(x.fired.is_empty() && y.fired.is_empty());
    let mut created = 0;
    let mut taken = 0;
    for i in 1..=30 {
        let now = at("2026-06-01T10:00:00.003Z") + TimeDelta::seconds(2 * i);
        let (x, y) = tokio::join!(a.tick(&w.catalog, now), b.tick(&w.catalog, now));
        for f in x.fired.iter().chain(&y.fired) {
            assert_eq!(
                f.slot,
                at("2026-06-01T10:00:00Z") + TimeDelta::seconds(2 * i)
            );
            match f.outcome {
                Outcome::Fired { created: true, .. } => created += 1,
                Outcome::Fired { created: false, .. } | Outcome::Taken => taken += 1,
                ref other => panic!("slot {i}: {other:?}"),
            }
        }
    }
    assert_eq!(created, 30);
    assert!(taken <= 30, "{taken}");
    let made = runs(&w, "often").await;
    assert_eq!(made.len(), 30);
    let mut slots: Vec<&str> = made.iter().map(|r| r.trigger.actor.as_str()).collect();
    slots.sort();
    slots.dedup();
    assert_eq!(slots.len(), 30, "one run per slot");
}

const HOURLY_SKIP: &str =
    "on:\n  schedule: [{ cron: \"0 * * * *\" }]\nsteps:\n  - run: echo tick\n";
const HOURLY_ONCE: &str =
    "on:\n  schedule: [{ cron: \"0 * * * *\", missed: once }]\nsteps:\n  - run: echo tick\n";

#[tokio::test]
async fn missed_slots_are_skipped_or_run_once_for_the_latest() {
    let w = world(&[("skipper", HOURLY_SKIP), ("catcher", HOURLY_ONCE)]).await;
    let mut s = scheduler(&w);
    s.tick(&w.catalog, at("2026-06-01T09:59:30Z")).await;
    let fired = s.tick(&w.catalog, at("2026-06-01T10:00:00.005Z")).await;
    assert_eq!(fired.fired.len(), 2);
    // Down from 10:20 to 13:17: the 11:00, 12:00 and 13:00 slots passed.
    let mut back = scheduler(&w);
    let tick = back.tick(&w.catalog, at("2026-06-01T13:17:00Z")).await;
    let by = |name: &str| {
        tick.fired
            .iter()
            .find(|f| f.pipeline == name)
            .cloned()
            .expect("handled")
    };
    assert_eq!(by("skipper").outcome, Outcome::Skipped);
    assert_eq!(by("skipper").slot, at("2026-06-01T13:00:00Z"));
    assert!(matches!(
        by("catcher").outcome,
        Outcome::Fired { created: true, .. }
    ));
    assert_eq!(by("catcher").slot, at("2026-06-01T13:00:00Z"));
    assert_eq!(tick.next, Some(at("2026-06-01T14:00:00Z")));
    // A second server coming up later finds the slot handled.
    let mut other = scheduler(&w);
    assert!(
        other
            .tick(&w.catalog, at("2026-06-01T13:18:00Z"))
            .await
            .fired
            .is_empty()
    );

    assert_eq!(runs(&w, "skipper").await.len(), 1);
    let caught = runs(&w, "catcher").await;
    assert_eq!(caught.len(), 2);
    assert!(
        caught[0]
            .trigger
            .actor
            .ends_with("slot 2026-06-01T13:00:00Z")
    );
    // A slot found due within a minute is late, not missed: it fires under `skip` too.
    let late = other.tick(&w.catalog, at("2026-06-01T14:00:45Z")).await;
    assert_eq!(late.fired.len(), 2);
    assert!(
        late.fired
            .iter()
            .all(|f| matches!(f.outcome, Outcome::Fired { created: true, .. }))
    );
}

fn madrid(cron: &str) -> String {
    format!(
        "on:\n  schedule: [{{ cron: \"{cron}\", timezone: Europe/Madrid }}]\nsteps:\n  - run: echo tick\n"
    )
}

/// A fixed-time line and a half-hourly one in Madrid, ticked every minute from `from` to `to`:
/// the slots each fired.
async fn dst_night(from: &str, to: &str) -> (World, Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) {
    let w = world(&[
        ("fixed", &madrid("30 2 * * *")),
        ("halfhourly", &madrid("*/30 * * * *")),
    ])
    .await;
    let mut s = scheduler(&w);
    let fired = walk(&mut s, &w, at(from), at(to), TimeDelta::minutes(1)).await;
    let of = |name: &str| -> Vec<DateTime<Utc>> {
        fired.iter().filter(|f| f.0 == name).map(|f| f.1).collect()
    };
    let (fixed, half) = (of("fixed"), of("halfhourly"));
    (w, fixed, half)
}

#[tokio::test]
async fn spring_forward_moves_a_fixed_time_into_the_next_valid_instant() {
    // Europe/Madrid, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
    let (_w, fixed, half) = dst_night("2026-03-28T22:00:00.010Z", "2026-03-30T03:00:00.010Z").await;
    // 02:30 does not exist that night: it runs at 03:00 CEST; the next night at 02:30 CEST.
    assert_eq!(
        fixed,
        vec![at("2026-03-29T01:00:00Z"), at("2026-03-30T00:30:00Z")]
    );
    let half: Vec<_> = half
        .into_iter()
        .filter(|t| *t < at("2026-03-29T03:00:00Z"))
        .collect();
    // Every half hour of real time; no 02:00 or 02:30 that night (the wall clock skips them).
    let local: Vec<String> = half
        .iter()
        .map(|t| {
            t.with_timezone(&chrono_tz::Europe::Madrid)
                .format("%H:%M")
                .to_string()
        })
        .collect();
    assert_eq!(
        local,
        [
            "23:30", "00:00", "00:30", "01:00", "01:30", "03:00", "03:30", "04:00", "04:30"
        ]
    );
}

#[tokio::test]
async fn fall_back_fires_a_fixed_time_once_and_an_interval_on_both_passes() {
    // Europe/Madrid, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:00-02:59 comes twice.
    let (w, fixed, half) = dst_night("2026-10-24T23:00:00.010Z", "2026-10-25T03:00:00.010Z").await;
    assert_eq!(
        fixed,
        vec![at("2026-10-25T00:30:00Z")],
        "once, on the first pass"
    );
    let expected: Vec<DateTime<Utc>> = (1..=8)
        .map(|i| at("2026-10-24T23:00:00Z") + TimeDelta::minutes(30 * i))
        .collect();
    assert_eq!(half, expected, "every half hour of real time, both passes");
    // Both passes' 02:30 are slots of their own: two runs, two keys.
    let runs = runs(&w, "halfhourly").await;
    let at_0230: Vec<_> = runs
        .iter()
        .filter(|r| {
            r.trigger.actor.ends_with("T00:30:00Z") || r.trigger.actor.ends_with("T01:30:00Z")
        })
        .collect();
    assert_eq!(at_0230.len(), 2);
}

#[test]
fn a_leap_day_line_waits_for_the_next_leap_year() {
    let w = skiff_core::pipeline::load(
        "on:\n  schedule: [{ cron: \"0 12 29 2 *\", timezone: Europe/Madrid }]\nsteps:\n  - run: x\n",
        "leap",
    )
    .expect("loads");
    let s = &w.on.schedules[0];
    let next = schedule::next_after(s, at("2026-12-01T00:00:00Z"));
    assert_eq!(next, Some(at("2028-02-29T11:00:00Z")));
    assert_eq!(
        schedule::upcoming(s, at("2026-12-01T00:00:00Z"), 2),
        vec![at("2028-02-29T11:00:00Z"), at("2032-02-29T11:00:00Z")]
    );
}
