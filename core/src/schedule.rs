//! Schedules (`on.schedule`): when a line fires, and firing each slot once.
//!
//! A slot is one instant a schedule's line names, in UTC. Each schedule has a mark in the
//! Store, the last slot it fired (or chose to skip); the [`Scheduler`] fires the slots after the
//! mark as they come due. A slot's run carries the idempotency key (pipeline, the entry's
//! position, line, timezone, slot), so a server that dies between creating the run and moving
//! the mark, a restart, or two servers ticking together still make one run per slot.
//!
//! Daylight-saving changes follow the line's kind (croner's rules, the ones of Vixie cron):
//! a fixed-time line (`30 2 * * *`) whose time falls in a spring-forward gap fires at the
//! first instant after the gap (03:00), and fires once on a fall-back night (on the first
//! pass); an interval line (`*/15 * * * *`, `0 * * * *`) has no slots in the gap and fires on
//! both passes of a fall-back hour, which are two slots.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;

use crate::catalog::{Catalog, Entry};
use crate::dispatch::{DispatchError, Dispatcher};
use crate::pipeline::{Missed, Schedule};
use crate::run::{RunId, Trigger, TriggerKind};

/// A slot this late is missed (skiff was not running when it came): it fires only under
/// `missed: once`. A slot found due sooner than this is on time and fires.
pub const LATE: TimeDelta = TimeDelta::seconds(60);

/// How often the scheduler looks at the catalog when no slot is due sooner (a schedule added
/// to a file starts counting within this).
pub const LOOK_EVERY: TimeDelta = TimeDelta::seconds(1);

/// The timezone a schedule's wall clock is in.
pub fn timezone(s: &Schedule) -> Tz {
    s.timezone.unwrap_or(chrono_tz::UTC)
}

/// The first slot strictly after `after`.
pub fn next_after(s: &Schedule, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    s.line
        .find_next_occurrence(&after.with_timezone(&timezone(s)), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The latest slot at or before `at`.
pub fn latest_at(s: &Schedule, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    s.line
        .find_previous_occurrence(&at.with_timezone(&timezone(s)), true)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The next `n` slots after `after`.
pub fn upcoming(s: &Schedule, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    let mut out = Vec::with_capacity(n);
    let mut at = after;
    while out.len() < n {
        match next_after(s, at) {
            Some(t) => {
                out.push(t);
                at = t;
            }
            None => break,
        }
    }
    out
}

/// The key of a pipeline's `index`th schedule: its mark in the Store, and (with the slot) its
/// runs' idempotency key. Changing the line or the timezone makes a new schedule.
pub fn key(pipeline: &str, index: usize, s: &Schedule) -> String {
    format!(
        "schedule:{pipeline}:{index}:{}:{}",
        s.cron.trim(),
        timezone(s).name()
    )
}

/// A slot's run's idempotency key.
pub fn slot_key(key: &str, slot: DateTime<Utc>) -> String {
    format!(
        "{key}@{}",
        slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// Who a scheduled run names as its trigger: the line, its timezone and the slot.
pub fn actor(s: &Schedule, slot: DateTime<Utc>) -> String {
    format!(
        "`{}` ({}), slot {}",
        s.cron.trim(),
        timezone(s).name(),
        slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// What a tick did with one due schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A run was made for the slot (`created: false` when another server, or this one before
    /// a restart, made it first).
    Fired { run: RunId, created: bool },
    /// The slot was missed and the policy is `skip`: the mark moved past it, no run.
    Skipped,
    /// Another server moved the mark first.
    Taken,
    /// The run could not be made (its params do not fit, ...): the mark moved on.
    Refused(String),
}

/// One due schedule handled by a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub pipeline: String,
    pub key: String,
    pub slot: DateTime<Utc>,
    /// From the slot's instant to the run created and its job pushed (to the tick's end for
    /// anything else).
    pub late: TimeDelta,
    pub outcome: Outcome,
}

/// What a tick did, and when the next one is due.
#[derive(Debug, Default)]
pub struct Tick {
    pub fired: Vec<Fired>,
    /// The earliest next slot of any schedule (the loop also looks again after
    /// [`LOOK_EVERY`]).
    pub next: Option<DateTime<Utc>>,
}

/// Fires the catalog's schedules. Holds only a cache of each schedule's next slot: the marks
/// are in the Store, so a restarted server, or a second one, carries on from them.
pub struct Scheduler {
    dispatcher: Dispatcher,
    /// Each schedule's next slot, as last read from its mark.
    due: HashMap<String, DateTime<Utc>>,
    /// How late runs are made; `Utc::now` outside tests.
    clock: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
}

impl Scheduler {
    pub fn new(dispatcher: Dispatcher) -> Self {
        Scheduler::with_clock(dispatcher, Arc::new(Utc::now))
    }

    /// A scheduler that reads lateness from `clock` (tests move time by hand).
    pub fn with_clock(
        dispatcher: Dispatcher,
        clock: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
    ) -> Self {
        Scheduler {
            dispatcher,
            due: HashMap::new(),
            clock,
        }
    }

    /// Handles every schedule whose next slot is at or before `now`. A Store that is away
    /// leaves the schedule due: the next tick tries again.
    pub async fn tick(&mut self, catalog: &Catalog, now: DateTime<Utc>) -> Tick {
        let mut tick = Tick::default();
        let mut seen = HashMap::with_capacity(self.due.len());
        let mut remember = |key: String, next: Option<DateTime<Utc>>, tick: &mut Tick| {
            // A schedule left out is read again on the next tick.
            if let Some(n) = next {
                seen.insert(key, n);
                tick.next = Some(tick.next.map_or(n, |t| t.min(n)));
            }
        };
        let mut due_now = Vec::new();
        for entry in catalog.entries() {
            let Some(p) = entry.pipeline.as_ref() else {
                continue;
            };
            for (index, s) in p.on.schedules.iter().enumerate() {
                let key = key(&entry.name, index, s);
                let due = match self.due.get(&key) {
                    Some(d) => Some(*d),
                    None => self.first_due(&key, s, now).await,
                };
                match due {
                    Some(d) if d <= now => due_now.push((entry, s, key, d)),
                    other => remember(key, other, &mut tick),
                }
            }
        }
        // Every schedule due at this instant fires at once: none waits for another's run and
        // mark (their writes still queue in order at the Store).
        let fired = futures_util::future::join_all(
            due_now
                .iter()
                .map(|(entry, s, key, d)| self.fire(entry, s, key, *d, now)),
        )
        .await;
        for ((_, _, key, _), result) in due_now.into_iter().zip(fired) {
            if let Ok((fired, next)) = result {
                tick.fired.push(fired);
                remember(key, next, &mut tick);
            }
        }
        self.due = seen;
        tick
    }

    /// A schedule seen for the first time: its next slot after its mark; a schedule with no
    /// mark is new, and starts from now (the slots before it were never promised).
    async fn first_due(
        &self,
        key: &str,
        s: &Schedule,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let store = &self.dispatcher.store;
        let mark = match store.schedule_mark(key).await {
            Ok(Some(m)) => m,
            Ok(None) => match store.advance_schedule(key, None, now).await {
                Ok(true) => now,
                // Another server set it first.
                Ok(false) => store.schedule_mark(key).await.ok().flatten()?,
                Err(e) => {
                    tracing::warn!(error = %e, schedule = key, "a schedule's mark cannot be set");
                    return None;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, schedule = key, "a schedule's mark cannot be read");
                return None;
            }
        };
        next_after(s, mark)
    }

    /// A due schedule: the latest slot up to `now` fires (once per slot), unless it is
    /// missed under `missed: skip`; the mark moves to it. Returns what happened and the next slot.
    async fn fire(
        &self,
        entry: &Entry,
        s: &Schedule,
        key: &str,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Fired, Option<DateTime<Utc>>), ()> {
        let store = &self.dispatcher.store;
        let mark = store.schedule_mark(key).await.map_err(|e| {
            tracing::warn!(error = %e, schedule = key, "a schedule's mark cannot be read");
        })?;
        let mark = mark.unwrap_or(now);
        let first = next_after(s, mark).ok_or(())?;
        let mut fired = Fired {
            pipeline: entry.name.clone(),
            key: key.to_string(),
            slot: due,
            late: TimeDelta::zero(),
            outcome: Outcome::Taken,
        };
        if first > now {
            // Another server fired it since this one last looked.
            return Ok((fired, Some(first)));
        }
        let slot = latest_at(s, now).filter(|l| *l >= first).unwrap_or(first);
        fired.slot = slot;
        let missed = now - slot > LATE;
        if missed && s.missed == Missed::Skip {
            fired.outcome = Outcome::Skipped;
            tracing::info!(
                pipeline = %entry.name, schedule = key, slot = %slot,
                "skipping the slots missed while skiff was not running (missed: skip)"
            );
        } else {
            let given: BTreeMap<String, String> = s.params.iter().cloned().collect();
            let trigger = Trigger {
                kind: TriggerKind::Schedule,
                actor: actor(s, slot),
            };
            match self
                .dispatcher
                .trigger_once(entry, &given, trigger, slot_key(key, slot))
                .await
            {
                Ok(created) => {
                    fired.outcome = Outcome::Fired {
                        run: created.run.id.clone(),
                        created: created.created,
                    };
                }
                Err(e @ (DispatchError::Store(_) | DispatchError::Queue(_))) => {
                    // Not made: the slot stays due and the next tick tries again.
                    tracing::warn!(error = %e, pipeline = %entry.name, slot = %slot,
                        "a scheduled run could not be made; trying again");
                    return Err(());
                }
                Err(e) => {
                    let why = match e {
                        DispatchError::Params(fields) => fields
                            .iter()
                            .map(|f| format!("param `{}`: {}", f.param, f.message))
                            .collect::<Vec<_>>()
                            .join("; "),
                        e => e.to_string(),
                    };
                    tracing::warn!(pipeline = %entry.name, slot = %slot, why = %why,
                        "a scheduled run was refused");
                    fired.outcome = Outcome::Refused(why);
                }
            }
        }
        fired.late = (self.clock)() - slot;
        match store.advance_schedule(key, Some(mark), slot).await {
            Ok(_) => {}
            Err(e) => {
                // The run (if any) is made and keyed by its slot: firing again makes no twin.
                tracing::warn!(error = %e, schedule = key, "a schedule's mark cannot be moved");
            }
        }
        Ok((fired, next_after(s, slot)))
    }
}
