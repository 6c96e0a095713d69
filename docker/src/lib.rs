//! skiff's Docker engine client, through bollard: build contexts made without following a link
//! ([`context`]), builds and pushes ([`engine`]), services as containers ([`service`]), remote
//! engines over TLS and SSH ([`remote`]). It knows nothing of runs or pipelines: the
//! worker's `docker/*` actions drive it. bollard stays in this crate, so the rest of skiff
//! builds without it.

pub mod context;
pub mod engine;
pub mod http;
pub mod neighbour;
pub mod remote;
pub mod service;

pub use context::{Context, ContextError, ContextSummary};
pub use engine::{BuildSpec, Credentials, Engine, EngineError, Lines};
pub use remote::{HostUrl, SshTarget, Target};
