//! What the Services view asks engines, through skiff-docker: the server's `EngineView`, given
//! to it by `skiff serve` (the server itself knows no Docker). It reaches the engines the
//! worker reaches: its own, and the remote ones its config declares, found by the ledger's
//! record of how each engine was reached (kind `engine`).

use std::sync::Arc;

use async_trait::async_trait;
use skiff_core::ledger::{ResourceQuery, ResourceState};
use skiff_core::store::Store;
use skiff_docker::Engine;
use skiff_server::services::{EngineState, EngineView, Observed};
use skiff_worker::actions::Tools;

pub struct Engines {
    pub tools: Arc<Tools>,
    pub store: Arc<dyn Store>,
}

impl Engines {
    /// The engine the ledger records as `id` (None: the local one), or why it cannot be asked.
    async fn reach(&self, id: Option<&str>) -> Result<Engine, String> {
        let local = self.tools.engine().await.map_err(|e| e.to_string());
        match (&local, id) {
            (Ok(local), None) => return Ok((*local).clone()),
            (Ok(local), Some(id)) if local.id == id => return Ok((*local).clone()),
            (Err(e), None) => return Err(e.clone()),
            _ => {}
        }
        let id = id.unwrap_or_default();
        let records = self
            .store
            .resources(&ResourceQuery {
                engine: Some(id.to_string()),
                states: vec![ResourceState::Live],
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut last = format!("on engine {id}, which this server does not reach");
        for host in records
            .iter()
            .filter(|r| r.kind == "engine")
            .map(|r| &r.name)
        {
            match self.tools.engine_at(Some(host)).await {
                Ok(engine) => return Ok(engine),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

#[async_trait]
impl EngineView for Engines {
    async fn observe(&self, engine: Option<&str>, container: &str) -> Observed {
        let unknown = |note: String| Observed {
            note: Some(note),
            ..Default::default()
        };
        let engine = match self.reach(engine).await {
            Ok(engine) => engine,
            Err(why) => return unknown(why),
        };
        // A remote engine's services are published on its host's loopback.
        let on = (!engine.is_local()).then(|| format!("on {}", engine.endpoint));
        match engine.observe(container).await {
            Ok(Some(c)) => Observed {
                state: if c.running {
                    EngineState::Running
                } else {
                    EngineState::Stopped
                },
                health: c.health,
                image: c.image,
                addresses: c
                    .ports
                    .iter()
                    .map(|(_, host)| format!("http://127.0.0.1:{host}"))
                    .collect(),
                since: c.since,
                note: match (c.exit_code.map(|code| format!("exit code {code}")), on) {
                    (Some(a), Some(b)) => Some(format!("{a}, {b}")),
                    (a, b) => a.or(b),
                },
            },
            Ok(None) => Observed {
                state: EngineState::Missing,
                note: Some(format!("the engine has no container {container}")),
                ..Default::default()
            },
            Err(e) => unknown(e.to_string()),
        }
    }
}
