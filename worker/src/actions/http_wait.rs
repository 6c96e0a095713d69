//! `http/wait`: GET a URL until it answers with the expected status, or the time is up.

use async_trait::async_trait;
use skiff_core::actions::Val;
use skiff_core::actions::http::{Wait, WaitOutputs, WaitWith};
use tokio::time::Instant;

use super::{ActionContext, ActionError, Execute};

#[async_trait]
impl Execute for Wait {
    async fn execute(with: WaitWith, cx: &ActionContext<'_>) -> Result<WaitOutputs, ActionError> {
        let target = with.url.get().map_err(ActionError::Inputs)?;
        let want = Val::opt(&with.status)
            .map_err(ActionError::Inputs)?
            .map_or(WaitWith::DEFAULT_STATUS, |s| s.0);
        let timeout = Val::opt(&with.timeout)
            .map_err(ActionError::Inputs)?
            .map_or(WaitWith::DEFAULT_TIMEOUT, |d| d.0);
        let interval = Val::opt(&with.interval)
            .map_err(ActionError::Inputs)?
            .map_or(WaitWith::DEFAULT_INTERVAL, |d| d.0);
        let host = target.authority.trim_end_matches(":80").to_string();
        let until = Instant::now() + timeout;
        let until = cx.deadline.map_or(until, |d| d.min(until));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = until.saturating_duration_since(Instant::now());
            let outcome = tokio::select! {
                r = tokio::time::timeout(left.max(std::time::Duration::from_millis(1)), skiff_docker::http::get_status(&target.authority, &host, &target.path)) => match r {
                    Ok(r) => r,
                    Err(_) => Err("no answer in time".to_string()),
                },
                () = cx.stop.cancelled() => return Err(ActionError::Stopped("stopped while waiting".into())),
            };
            let last = match outcome {
                Ok(code) if code == want => {
                    cx.note(&format!(
                        "{} answered {code} after {attempts} attempt(s)",
                        target.text
                    ))
                    .await;
                    return Ok(WaitOutputs {
                        status: code,
                        attempts,
                    });
                }
                Ok(code) => format!("answered {code}, waiting for {want}"),
                Err(e) => e,
            };
            if attempts == 1 || attempts.is_multiple_of(20) {
                cx.note(&format!("{}: {last} (attempt {attempts})", target.text))
                    .await;
            }
            if Instant::now() + interval >= until {
                return Err(ActionError::failed(format!(
                    "{} was not ready within {:?}: {last}",
                    target.text, timeout
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = cx.stop.cancelled() => return Err(ActionError::Stopped("stopped while waiting".into())),
            }
        }
    }
}
