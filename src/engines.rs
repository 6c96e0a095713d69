//! What the Services view asks engines, through skiff-docker: the server's `EngineView`, given
//! to it by `skiff serve` (the server itself knows no Docker).

use async_trait::async_trait;
use skiff_docker::Engine;
use skiff_server::services::{EngineState, EngineView, Observed};

/// The engines this server reaches: the local one, connected on first use (a failed connect is
/// tried again next time).
#[derive(Default)]
pub struct Engines {
    local: tokio::sync::OnceCell<Engine>,
}

#[async_trait]
impl EngineView for Engines {
    async fn observe(&self, engine: Option<&str>, container: &str) -> Observed {
        let unknown = |note: String| Observed {
            note: Some(note),
            ..Default::default()
        };
        let local = match self.local.get_or_try_init(Engine::local).await {
            Ok(local) => local,
            Err(e) => return unknown(e.to_string()),
        };
        if let Some(id) = engine
            && id != local.id
        {
            return unknown("on an engine this server does not reach".into());
        }
        match local.observe(container).await {
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
                note: c.exit_code.map(|code| format!("exit code {code}")),
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
