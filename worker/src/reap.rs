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
//!
//! [`prune`] (`docker/prune`) goes further, for things older than a given age: a service's
//! containers other than its current one, and the images no service owns (see
//! [`service_images`]), and, through the `skiff.run` label, what skiff made here whose record
//! was lost, when that run is this Store's and over.

use std::collections::{HashMap, HashSet};

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
    // A service's things stay until their time is up; an intent of one (a deploy that never
    // finished) is its run's like anything else.
    if r.service.is_some() && !expired && r.state == ResourceState::Live {
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

/// Records on an engine, in the given states (all, when empty), newest first.
async fn records(
    store: &dyn Store,
    engine: &Engine,
    states: Vec<ResourceState>,
) -> Result<Vec<Resource>, String> {
    store
        .resources(&ResourceQuery {
            engine: Some(engine.id.clone()),
            states,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading the resources ledger: {e}"))
}

/// Each service's current container on this engine: its newest live container record.
fn current_containers(records: &[Resource]) -> HashMap<&str, &Resource> {
    let mut current = HashMap::new();
    for r in records {
        if r.kind == "container"
            && r.state == ResourceState::Live
            && let Some(service) = r.service.as_deref()
        {
            current.entry(service).or_insert(r);
        }
    }
    current
}

/// The images the services on this engine own (their IDs): for every service with a live
/// container, the images of its current and previous versions (the newest two its successful
/// deploys recorded, kind `image` with the service), and the image its current container runs.
/// Start needs the one, a rollback or a rerun of the version before the other.
pub async fn service_images(store: &dyn Store, engine: &Engine) -> Result<HashSet<String>, String> {
    let all = records(store, engine, vec![ResourceState::Live]).await?;
    Ok(owned_images(&all, engine).await)
}

async fn owned_images(live: &[Resource], engine: &Engine) -> HashSet<String> {
    let current = current_containers(live);
    let mut owned = HashSet::new();
    for (service, container) in &current {
        let versions: Vec<&str> = {
            let mut seen = Vec::new();
            for r in live {
                if r.kind == "image"
                    && r.service.as_deref() == Some(service)
                    && let Some(id) = r.external_id.as_deref()
                    && !seen.contains(&id)
                {
                    seen.push(id);
                }
            }
            seen
        };
        owned.extend(versions.into_iter().take(2).map(str::to_string));
        // What the current container runs, whatever was recorded.
        if let Some(id) = container.external_id.as_deref()
            && let Ok(c) = engine.container(id).await
            && !c.image_id.is_empty()
        {
            owned.insert(c.image_id);
        }
    }
    owned
}

/// After an unfinished deploy's container (an intent of a service) is gone: the service's
/// current version, when it stopped after that deploy began, was stopped by the deploy to free
/// a fixed host port, and the deploy never got to bring it back: it is started again. A
/// version stopped before the deploy began (asleep on purpose) stays stopped.
async fn restore_replaced(store: &dyn Store, engine: &Engine, r: &Resource) -> Option<String> {
    if r.kind != "container" || r.state != ResourceState::Creating {
        return None;
    }
    let service = r.service.as_deref()?;
    let live = store
        .resources(&ResourceQuery {
            service: Some(service.to_string()),
            engine: Some(engine.id.clone()),
            states: vec![ResourceState::Live],
            ..Default::default()
        })
        .await
        .ok()?;
    let current = live
        .iter()
        .find(|c| c.kind == "container" && c.created_at < r.created_at)?;
    let id = current.external_id.as_deref()?;
    let stopped = engine.stopped_at(id).await.ok()??;
    if stopped < r.created_at {
        return None;
    }
    Some(match engine.start_container(id).await {
        Ok(()) => format!(
            "started {} again (the unfinished deploy had stopped it)",
            current.name
        ),
        Err(e) => format!("starting {} again failed: {e}", current.name),
    })
}

/// Reaps what this engine holds of the ledger's live and intended things.
pub async fn reap(
    store: &dyn Store,
    engine: &Engine,
    dry_run: bool,
) -> Result<Vec<Reaped>, String> {
    let now = Utc::now();
    let records = records(
        store,
        engine,
        vec![ResourceState::Creating, ResourceState::Live],
    )
    .await?;
    let owned = service_images(store, engine).await?;
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
        if existed
            && r.kind == "image"
            && (engine.image_in_use(&target).await || owned.contains(&target))
        {
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
        let mut why = why;
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
            if let Some(back) = restore_replaced(store, engine, &r).await {
                why = format!("{why}; {back}");
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

/// What [`prune`] did: what went (or, dry, would go), and how many old things it kept because a
/// service owns them.
#[derive(Debug, Default)]
pub struct Pruned {
    pub removed: Vec<Reaped>,
    pub kept: u32,
}

/// One thing on the engine prune looks at: from a record, or found by its label alone.
struct Candidate {
    kind: String,
    /// What the engine knows it by (an ID, or a recorded name for an intent).
    target: String,
    name: String,
    service: Option<String>,
    run: Option<skiff_core::run::RunId>,
    made: DateTime<Utc>,
    /// Its ledger records (none: the record was lost).
    records: Vec<String>,
    /// Found by a recorded name only (an intent): it must carry the run's label.
    by_name: bool,
}

/// Removes from this engine what skiff made longer ago than `older_than` and no service owns:
/// a container of a run that is over (a service's only when it is not the service's current
/// one), an image no container uses that is not a service's current or previous version.
/// Decisions come from the ledger; a thing with skiff's `skiff.run` label and no record is
/// judged the same way when its run is in this Store (the record was lost), and left alone
/// when it is not (another skiff's, or a run retention deleted).
pub async fn prune(
    store: &dyn Store,
    engine: &Engine,
    older_than: std::time::Duration,
    dry_run: bool,
) -> Result<Pruned, String> {
    let now = Utc::now();
    let cutoff = now - chrono::TimeDelta::from_std(older_than).unwrap_or(chrono::TimeDelta::MAX);
    let all = records(store, engine, Vec::new()).await?;
    let open: Vec<Resource> = all
        .iter()
        .filter(|r| r.state != ResourceState::Removed)
        .filter(|r| r.kind == "container" || r.kind == "image")
        .cloned()
        .collect();
    let live: Vec<Resource> = open
        .iter()
        .filter(|r| r.state == ResourceState::Live)
        .cloned()
        .collect();
    let current: HashMap<String, String> = current_containers(&live)
        .into_iter()
        .filter_map(|(s, r)| Some((s.to_string(), r.external_id.clone()?)))
        .collect();
    let owned = owned_images(&live, engine).await;

    // One candidate per thing: an image recorded by its build and by the deploys that ran it
    // is one image, as old as its newest record.
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut by_target: HashMap<(String, String), usize> = HashMap::new();
    for r in &open {
        let (target, by_name) = match &r.external_id {
            Some(id) => (id.clone(), false),
            None => (r.name.clone(), true),
        };
        if target.is_empty() {
            continue;
        }
        match by_target.get(&(r.kind.clone(), target.clone())) {
            Some(&i) => {
                let c = &mut candidates[i];
                c.records.push(r.id.clone());
                c.made = c.made.max(r.created_at);
                c.service = c.service.clone().or_else(|| r.service.clone());
            }
            None => {
                by_target.insert((r.kind.clone(), target.clone()), candidates.len());
                candidates.push(Candidate {
                    kind: r.kind.clone(),
                    target,
                    name: r.name.clone(),
                    service: r.service.clone(),
                    run: r.run.clone(),
                    made: r.created_at,
                    records: vec![r.id.clone()],
                    by_name,
                });
            }
        }
    }
    // Things skiff labelled that no record names at all (any state: a record marked removed
    // whose thing is still there counts as lost too).
    let known: HashSet<&str> = all
        .iter()
        .filter(|r| r.state != ResourceState::Removed)
        .flat_map(|r| [r.external_id.as_deref(), Some(r.name.as_str())])
        .flatten()
        .collect();
    for l in engine.labelled().await.map_err(|e| e.to_string())? {
        if known.contains(l.id.as_str()) || (!l.name.is_empty() && known.contains(l.name.as_str()))
        {
            continue;
        }
        let Some(made) = l.created else { continue };
        candidates.push(Candidate {
            kind: l.kind.to_string(),
            name: if l.name.is_empty() {
                l.id.clone()
            } else {
                l.name
            },
            target: l.id,
            service: l.service,
            run: l.run.parse().ok(),
            made,
            records: Vec::new(),
            by_name: false,
        });
    }

    // Containers first: an old container goes before the image it held is looked at.
    candidates.sort_by_key(|c| c.kind != "container");
    let mut pruned = Pruned::default();
    // What went (or, dry, would have): an image whose only users are among them is unused.
    let mut gone: HashSet<String> = HashSet::new();
    for c in candidates {
        if c.made > cutoff {
            continue;
        }
        let run = match &c.run {
            Some(id) => store
                .get_run(id)
                .await
                .map_err(|e| format!("reading run {id}: {e}"))?,
            None => None,
        };
        let lost = c.records.is_empty();
        let why_run = match &run {
            Some(run) if !run.status.is_terminal() => continue,
            Some(run) => format!("its run ({} #{}) is over", run.pipeline, run.number),
            // A lost record's thing whose run this Store does not know may be another skiff's.
            None if lost => continue,
            None => "its run is gone".to_string(),
        };
        let existed = match c.kind.as_str() {
            "container" => engine.container(&c.target).await.is_ok(),
            _ => engine.has_image(&c.target).await,
        };
        if existed
            && c.by_name
            && let Some(run) = &c.run
            && !engine
                .labelled_with_run(&c.kind, &c.target, run.as_str())
                .await
        {
            continue;
        }
        let why = match (c.kind.as_str(), &c.service) {
            ("container", Some(service)) => match current.get(service) {
                // A service's current container is the service: never pruned.
                Some(id) if *id == c.target => {
                    pruned.kept += 1;
                    continue;
                }
                Some(_) => format!("an old version of service {service} ({why_run})"),
                // Lost, and the ledger knows no current one: it may be the service itself.
                None if lost => continue,
                None => format!("service {service} has no current version ({why_run})"),
            },
            ("container", None) => why_run,
            _ => {
                let in_use = existed
                    && engine
                        .containers_using(&c.target)
                        .await
                        .is_none_or(|users| users.iter().any(|u| !gone.contains(u)));
                if owned.contains(&c.target) || in_use {
                    pruned.kept += 1;
                    continue;
                }
                format!("no service runs it ({why_run})")
            }
        };
        let why = if lost {
            format!("{why}; its ledger record was lost (found by its label)")
        } else {
            why
        };
        if !dry_run {
            if existed {
                let removed = match c.kind.as_str() {
                    "container" => engine.remove_container(&c.target).await,
                    _ => engine.remove_image(&c.target).await,
                };
                if let Err(e) = removed {
                    tracing::warn!(target = %c.target, error = %e, "prune could not remove it");
                    continue;
                }
            }
            for id in &c.records {
                let update = ResourceUpdate {
                    state: Some(ResourceState::Removed),
                    ..Default::default()
                };
                store
                    .update_resource(None, id, &update)
                    .await
                    .map_err(|e| format!("closing ledger record {id}: {e}"))?;
            }
        }
        if c.kind == "container"
            && let Ok(found) = engine.container(&c.target).await
        {
            gone.insert(found.id);
        }
        gone.insert(c.target.clone());
        pruned.removed.push(Reaped {
            record: c.records.first().cloned().unwrap_or_default(),
            kind: c.kind,
            name: if c.name.is_empty() { c.target } else { c.name },
            why,
            existed,
        });
    }
    Ok(pruned)
}
