//! A run's writes to the Store, under its claim: retried while the Store is briefly away, held
//! back while it stays away (the run goes on to its `finally` steps meanwhile), and refused for
//! good once the claim is no longer the run's (another worker took it over).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_core::run::{LogChunk, Run, RunStatus, StepRecord};
use skiff_core::store::{Claim, Store, StoreError};
use tokio_util::sync::CancellationToken;

/// The first pause before a failed write is tried again; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Log bytes held back while the Store is away, at the most; what comes after is dropped (and
/// the log says so when it can).
const MAX_HELD_LOG: usize = 16 << 20;

/// Whether an error may pass if the write is tried again (the Store was unreachable or busy),
/// as opposed to an answer (a stale claim, a run that is gone).
fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(_))
}

/// What happened to the Store, as the runner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Writes failed for longer than the patience: held back since, with the last error.
    Away(String),
    /// The claim is no longer the run's: nothing more is written.
    Lost,
}

struct Held {
    steps: BTreeMap<u32, StepRecord>,
    logs: Vec<LogChunk>,
    log_bytes: usize,
    dropped_log_bytes: usize,
}

/// The writes of one run. Cloned handles share their state.
#[derive(Clone)]
pub struct Recorder {
    store: Arc<dyn Store>,
    claim: Claim,
    /// How long a write is retried before the Store counts as away.
    patience: Duration,
    health: Arc<Mutex<Health>>,
    held: Arc<Mutex<Held>>,
    /// Fired when the Store goes away or the claim is lost: the runner stops its main steps
    /// (and, for a lost claim, everything).
    pub trouble: CancellationToken,
}

impl Recorder {
    pub fn new(store: Arc<dyn Store>, claim: Claim, patience: Duration) -> Self {
        Recorder {
            store,
            claim,
            patience,
            health: Arc::new(Mutex::new(Health::Up)),
            held: Arc::new(Mutex::new(Held {
                steps: BTreeMap::new(),
                logs: Vec::new(),
                log_bytes: 0,
                dropped_log_bytes: 0,
            })),
            trouble: CancellationToken::new(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    pub fn health(&self) -> Health {
        match self.health.lock() {
            Ok(h) => h.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_health(&self, health: Health) {
        let mut h = match self.health.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        // A lost claim stays lost.
        if *h != Health::Lost {
            *h = health;
        }
        drop(h);
        self.trouble.cancel();
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        match self.held.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Runs `write` until it succeeds, fails with an answer, or the Store has been away for
    /// longer than the patience (`None` then: the caller holds the write back).
    async fn attempt<T, F, Fut>(&self, what: &str, write: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        match self.health() {
            Health::Lost => return None,
            // While away, one try each time: the first that passes brings the Store back.
            Health::Away(_) => {
                return match write().await {
                    Ok(v) => {
                        self.back().await;
                        Some(v)
                    }
                    Err(e) => {
                        self.failed(what, e);
                        None
                    }
                };
            }
            Health::Up => {}
        }
        let started = tokio::time::Instant::now();
        let mut pause = FIRST_PAUSE;
        loop {
            match write().await {
                Ok(v) => return Some(v),
                Err(e) if transient(&e) && started.elapsed() + pause <= self.patience => {
                    tracing::warn!(run_id = %self.claim.run, error = %e, "writing {what} failed; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(e) => {
                    self.failed(what, e);
                    return None;
                }
            }
        }
    }

    fn failed(&self, what: &str, e: StoreError) {
        match e {
            StoreError::StaleClaim { .. } | StoreError::NotFound(_) => {
                tracing::error!(run_id = %self.claim.run, error = %e, "the run's claim is lost; stopping it without writing more");
                self.set_health(Health::Lost);
            }
            e => {
                if !matches!(self.health(), Health::Away(_)) {
                    tracing::error!(run_id = %self.claim.run, error = %e, "writing {what} failed for {:?}; holding the run's writes back until the store is back", self.patience);
                }
                self.set_health(Health::Away(e.to_string()));
            }
        }
    }

    /// The Store answered again: writes what was held back, in order (each write tried once;
    /// a failure puts the rest back and the Store counts as away again).
    async fn back(&self) {
        {
            let mut h = match self.health.lock() {
                Ok(h) => h,
                Err(poisoned) => poisoned.into_inner(),
            };
            if *h != Health::Lost {
                *h = Health::Up;
            }
        }
        let (steps, mut logs, dropped) = {
            let mut held = self.held();
            let steps = std::mem::take(&mut held.steps);
            let logs = std::mem::take(&mut held.logs);
            let dropped = std::mem::take(&mut held.dropped_log_bytes);
            held.log_bytes = 0;
            (steps, logs, dropped)
        };
        if dropped > 0 {
            logs.push(LogChunk::skiff(
                None,
                format!("[skiff] {dropped} bytes of log were lost while the store was away\n")
                    .into_bytes(),
            ));
        }
        if !logs.is_empty()
            && let Err(e) = self.store.append_logs(&self.claim, &logs).await
        {
            self.hold_logs(&logs);
            self.held().steps.extend(steps);
            self.failed("the log", e);
            return;
        }
        let mut steps = steps.into_iter();
        while let Some((index, record)) = steps.next() {
            if let Err(e) = self.store.update_step(&self.claim, &record).await {
                let mut held = self.held();
                held.steps.insert(index, record);
                held.steps.extend(steps);
                drop(held);
                self.failed("a step", e);
                return;
            }
        }
        tracing::warn!(run_id = %self.claim.run, "the store is back; what was held back is written");
    }

    async fn write_logs_now(&self, chunks: &[LogChunk]) -> bool {
        let store = &self.store;
        let claim = &self.claim;
        match self
            .attempt("the log", || store.append_logs(claim, chunks))
            .await
        {
            Some(_) => true,
            None => {
                self.hold_logs(chunks);
                false
            }
        }
    }

    fn hold_logs(&self, chunks: &[LogChunk]) {
        if self.health() == Health::Lost {
            return;
        }
        let mut held = self.held();
        for chunk in chunks {
            if held.log_bytes + chunk.data.len() > MAX_HELD_LOG {
                held.dropped_log_bytes += chunk.data.len();
            } else {
                held.log_bytes += chunk.data.len();
                held.logs.push(chunk.clone());
            }
        }
    }

    /// Writes a step's record (or holds it back: the latest record of each step is kept).
    pub async fn step(&self, record: &StepRecord) {
        let store = &self.store;
        let claim = &self.claim;
        if self
            .attempt("a step", || store.update_step(claim, record))
            .await
            .is_none()
            && self.health() != Health::Lost
        {
            self.held().steps.insert(record.index, record.clone());
        }
    }

    /// [`Recorder::step`] for a record the step's next one may supersede (its "running"): when
    /// `superseded` fires before the Store has taken the write, the write is dropped. Only while
    /// the Store is up: then the write's only await points are the Store call itself (dropped
    /// before the Store took it, nothing is written: the embedded Store leaves out a step record
    /// nobody waits for when its group commit is taken; after, it still runs, ahead of the next
    /// write of the run) and the pause between tries. While it is away, the record is held as
    /// usual.
    pub async fn step_unless_superseded(
        &self,
        record: &StepRecord,
        superseded: &CancellationToken,
    ) {
        if self.health() != Health::Up {
            return self.step(record).await;
        }
        let store = &self.store;
        let claim = &self.claim;
        tokio::select! {
            biased;
            () = superseded.cancelled() => {}
            written = self.attempt("a step", || store.update_step(claim, record)) => {
                if written.is_none() && self.health() != Health::Lost {
                    self.held().steps.insert(record.index, record.clone());
                }
            }
        }
    }

    /// Appends log chunks (or holds them back).
    pub async fn logs(&self, chunks: &[LogChunk]) {
        if chunks.is_empty() {
            return;
        }
        self.write_logs_now(chunks).await;
    }

    /// The run as stored (for a cancel's reason); `None` when it cannot be read now.
    pub async fn current(&self) -> Option<Run> {
        let store = &self.store;
        let id = &self.claim.run;
        self.attempt("(reading the run)", || async {
            store
                .get_run(id)
                .await
                .and_then(|r| r.ok_or_else(|| StoreError::NotFound(id.clone())))
        })
        .await
    }

    /// Keeps a step's record to be written with the run's end, in the same write (for the run's
    /// last step, which the run's end follows at once: one write instead of two).
    pub fn step_at_end(&self, record: &StepRecord) {
        if self.health() != Health::Lost {
            self.held().steps.insert(record.index, record.clone());
        }
    }

    /// Ends the run: the log held back is written first, then the end state with the step
    /// records held back (or kept for it by [`Recorder::step_at_end`]), in one write. While the
    /// Store stays away this keeps trying (every few seconds) until it is back, or `give_up`
    /// fires. Returns false when the end could not be written (the claim was lost, or gave up).
    pub async fn finish(
        &self,
        status: RunStatus,
        reason: Option<&str>,
        give_up: &CancellationToken,
    ) -> bool {
        loop {
            match self.health() {
                Health::Lost => return false,
                Health::Away(_) => {
                    let store = &self.store;
                    let id = &self.claim.run;
                    // A cheap read tells whether it is back.
                    if store.get_run(id).await.is_ok() {
                        self.back().await;
                        continue;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(self.patience.min(MAX_PAUSE)) => continue,
                        () = give_up.cancelled() => return false,
                    }
                }
                Health::Up => {}
            }
            if !self.held().logs.is_empty() {
                self.back().await;
                continue;
            }
            let steps: Vec<StepRecord> = std::mem::take(&mut self.held().steps)
                .into_values()
                .collect();
            let store = &self.store;
            let claim = &self.claim;
            if self
                .attempt("the run's end", || {
                    store.finish_run(claim, &steps, status, reason)
                })
                .await
                .is_some()
            {
                return true;
            }
            // Not written: the steps wait with whatever else is held back.
            if self.health() != Health::Lost {
                let mut held = self.held();
                for step in steps {
                    held.steps.entry(step.index).or_insert(step);
                }
            }
        }
    }

    /// Keeps the claim's lease from running out while the run goes on: renews it every third of
    /// `lease`. A claim that is no longer the run's fires `trouble` (the run stops).
    pub fn keep_claim(&self, lease: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let every = (lease / 3).max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                match me.store.renew_claim(&me.claim, lease).await {
                    Ok(_) => {}
                    Err(e @ (StoreError::StaleClaim { .. } | StoreError::NotFound(_))) => {
                        me.failed("the claim", e);
                        return;
                    }
                    // The writes notice a Store that stays away; a renewal just tries again.
                    Err(e) => {
                        tracing::warn!(run_id = %me.claim.run, error = %e, "renewing the run's claim failed")
                    }
                }
            }
        })
    }
}
