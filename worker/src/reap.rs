//! The reaper: removes from an engine what runs created and nobody keeps, deciding from the
//! resources ledger (its records and the runs' states), never from "stopped and labelled" alone:
//! a sleeping service is stopped on purpose.
//!
//! - A container of a service is kept while it is not expired (`expires_at`, a temporary
//!   deploy's `ttl`), running or stopped.
//! - Anything else (a container without a service, an expired one, a built image) goes once its
//!   run is over; an image only when no container uses it (a service's current and previous
//!   versions need theirs for Start and rollback).
//! - An intent record (`creating`: a crash mid-create) is looked for by the name it recorded and
//!   the run label the thing would carry; what is found goes, and the record is closed.

use chrono::{DateTime, Utc};
use skiff_core::ledger::{Resource, ResourceQuery, ResourceState, ResourceUpdate};
use skiff_core::store::Store;
use skiff_docker::Engine;

/// One thing the reaper removed (or, dry, would remove), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub record: String,
    pub kind: String,
    pub name: String,
    pub why: String,
    /// Whether it was still there (an intent record may find nothing).
    pub existed: bool,
}

/// Why a record's thing should go, or None to keep it.
async fn verdict(store: &dyn Store, r: &Resource, now: DateTime<Utc>) -> Option<String> {
    let expired = r.expires_at.is_some_and(|at| at <= now);
    if r.service.is_some() && !expired {
        return None;
    }
    if expired {
        return Some("its time is up".into());
    }
    let run = match &r.run {
        Some(id) => store.get_run(id).await.ok().flatten(),
        None => None,
    };
    match run {
        Some(run) if !run.status.is_terminal() => None,
        Some(run) => Some(format!(
            "its run ({} #{}) is over",
            run.pipeline, run.number
        )),
        None => Some("its run is gone".into()),
    }
}

/// Reaps what this engine holds of the ledger's live and intended things.
pub async fn reap(
    store: &dyn Store,
    engine: &Engine,
    dry_run: bool,
) -> Result<Vec<Reaped>, String> {
    let now = Utc::now();
    let records = store
        .resources(&ResourceQuery {
            engine: Some(engine.id.clone()),
            states: vec![ResourceState::Creating, ResourceState::Live],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading the resources ledger: {e}"))?;
    let mut reaped = Vec::new();
    for r in records {
        if r.kind != "container" && r.kind != "image" {
            continue;
        }
        let Some(why) = verdict(store, &r, now).await else {
            continue;
        };
        let target = r.external_id.clone().unwrap_or_else(|| r.name.clone());
        if target.is_empty() {
            continue;
        }
        let existed = match r.kind.as_str() {
            "container" => engine.container(&target).await.is_ok(),
            _ => engine.has_image(&target).await,
        };
        if existed && r.kind == "image" && engine.image_in_use(&target).await {
            continue;
        }
        // An intent found by name only goes when it carries the run's label: a name alone
        // could be someone else's.
        if existed
            && r.external_id.is_none()
            && let Some(run) = &r.run
            && !engine
                .labelled_with_run(&r.kind, &target, run.as_str())
                .await
        {
            continue;
        }
        if !dry_run {
            if existed {
                let removed = match r.kind.as_str() {
                    "container" => engine.remove_container(&target).await,
                    _ => engine.remove_image(&target).await,
                };
                if let Err(e) = removed {
                    tracing::warn!(record = %r.id, error = %e, "the reaper could not remove it");
                    continue;
                }
            }
            let update = ResourceUpdate {
                state: Some(ResourceState::Removed),
                ..Default::default()
            };
            store
                .update_resource(None, &r.id, &update)
                .await
                .map_err(|e| format!("closing ledger record {}: {e}", r.id))?;
        }
        reaped.push(Reaped {
            record: r.id,
            kind: r.kind,
            name: if r.name.is_empty() { target } else { r.name },
            why,
            existed,
        });
    }
    Ok(reaped)
}
