//! The resources ledger: every external thing a run creates (a container, a pushed image, a spot
//! instance) is recorded before it is created (an intent, `creating`), then as it is (`live`,
//! with the engine's own id), then when it is gone (`removed`). A crash in the middle of a create
//! leaves an intent the reaper can look for; decisions about what to remove come from here, never
//! from "stopped and labelled" alone.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::run::RunId;

/// Where a resource is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceState {
    /// About to be created (or being created): it may or may not exist.
    Creating,
    Live,
    Removed,
}

impl ResourceState {
    pub const ALL: &[ResourceState] = &[
        ResourceState::Creating,
        ResourceState::Live,
        ResourceState::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceState::Creating => "creating",
            ResourceState::Live => "live",
            ResourceState::Removed => "removed",
        }
    }
}

impl FromStr for ResourceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourceState::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown resource state `{s}`"))
    }
}

impl fmt::Display for ResourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A thing to record before creating it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewResource {
    /// skiff's own id for it, chosen by the creator so that a retried create finds the same
    /// record (from the run, the step and what it makes, say): recording the same id twice
    /// answers the first record.
    pub id: String,
    /// `container`, `image`, `instance`...
    pub kind: String,
    /// A name people recognise (a container's name, an image reference).
    pub name: String,
    /// Which engine or account it lives on (a Docker engine's ID, an AWS account and region).
    pub engine: Option<String>,
    /// The service it belongs to, if any (kept while the service exists).
    pub service: Option<String>,
    /// The run (and step) that creates it.
    pub run: Option<RunId>,
    pub step: Option<u32>,
    /// When it should be removed at the latest (a temporary deploy, a spot node's TTL).
    pub expires_at: Option<DateTime<Utc>>,
    /// What it costs per hour, when known.
    pub hourly_price: Option<f64>,
}

/// A resource as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub engine: Option<String>,
    pub service: Option<String>,
    pub run: Option<RunId>,
    pub step: Option<u32>,
    pub state: ResourceState,
    /// The engine's own id, once it exists (a container id, an instance id, a digest).
    pub external_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub hourly_price: Option<f64>,
}

/// A change to a recorded resource: the fields set are changed, the others kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceUpdate {
    pub state: Option<ResourceState>,
    pub external_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Which resources to list (every set field must match); newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceQuery {
    pub run: Option<RunId>,
    pub service: Option<String>,
    pub engine: Option<String>,
    /// Any of these states (empty: any state).
    pub states: Vec<ResourceState>,
}
