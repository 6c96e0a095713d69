//! `uses:` steps: one attempt of a built-in action, cooperative stop with a grace period.

use super::*;

impl Runner<'_> {
    /// One attempt of a `uses:` step: the action runs in this process, asked to stop (with the
    /// grace period) on a cancel or a timeout.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt_action(
        &self,
        index: usize,
        step: &Step,
        action: &'static dyn skiff_core::actions::Spec,
        with: &skiff_core::pipeline::WithValue,
        scope: &RunScope<'_>,
        stop: &CancellationToken,
        step_deadline: Option<Instant>,
    ) -> Result<AttemptResult, RunnerError> {
        let inputs = match actions::eval_with(with, scope) {
            Ok(inputs) => inputs,
            Err(e) => return Ok(self.action_failed(index, action.name(), &e).await),
        };
        let timeout_text = human(step.timeout.unwrap_or(FINALLY_DEFAULT_TIMEOUT));
        let cx = ActionContext {
            run: &self.run.id,
            run_number: self.run.number,
            pipeline: &self.run.pipeline,
            step: index as u32,
            step_id: &step.id,
            attempt: self.records[index].attempt,
            secrets: actions::named_secrets(with, &self.opts.secrets),
            workspace: &self.dirs.workspace,
            owner: self.user.as_ref().map(|u| (u.uid, u.gid)),
            tools: &self.opts.tools,
            log: &self.log,
            rec: &self.rec,
            stop: CancellationToken::new(),
            grace: self.opts.kill_grace,
            deadline: step_deadline,
        };
        let mut work = std::pin::pin!(actions::run(action.name(), &inputs, &cx));
        let sleep = async {
            match step_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // On a timeout or a stop the action is asked to stop (its token), and given the
        // grace period to end what it started and record what exists; only then is it
        // abandoned.
        let stopped = tokio::select! {
            r = &mut work => {
                return Ok(match r {
                    Ok(outputs) => AttemptResult::succeeded(outputs),
                    Err(e @ actions::ActionError::Stopped(_)) => AttemptResult::from_action_error(&e),
                    Err(e) => self.action_failed(index, action.name(), &e).await,
                });
            }
            () = sleep, if self.step_timeout_hit(step, step_deadline.unwrap_or_else(Instant::now)) => AttemptResult {
                status: StepStatus::TimedOut,
                ..AttemptResult::failed(format!("timed out after {timeout_text}"))
            },
            () = stop.cancelled() => self.stopped_result(step.phase),
        };
        cx.stop.cancel();
        if tokio::time::timeout(cx.grace, &mut work).await.is_err() {
            self.log
                .note(
                    Some(index as u32),
                    &format!(
                        "`{}` did not stop within {}; it was abandoned",
                        action.name(),
                        human(cx.grace)
                    ),
                )
                .await;
        }
        Ok(stopped)
    }

    /// A failed attempt, with its reason in the log too (where people read), not only in the
    /// step's record.
    async fn action_failed(
        &self,
        index: usize,
        name: &str,
        e: &actions::ActionError,
    ) -> AttemptResult {
        self.log
            .note(Some(index as u32), &format!("`{name}` failed: {e}"))
            .await;
        AttemptResult::from_action_error(e)
    }
}
