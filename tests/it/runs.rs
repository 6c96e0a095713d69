//! `skiff run`: steps, conditions, outputs, retries, timeouts, cancel, finally, masking,
//! injection, and the record left in the Store.

use std::collections::BTreeMap;

use serde_json::Value;
use skiff_core::run::{RunStatus, StepStatus};

use crate::harness::{Live, Sandbox, all_gone, pids};

/// A run as the API shows it, typed for assertions.
#[derive(Debug)]
struct RunView {
    status: RunStatus,
    reason: Option<String>,
    params: BTreeMap<String, String>,
    trigger: String,
}

#[derive(Debug)]
struct StepView {
    status: StepStatus,
    attempt: u64,
    exit_code: Option<i64>,
    outputs: BTreeMap<String, String>,
}

fn text_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The newest run `skiff run` recorded in the sandbox, its steps and its log, read over HTTP.
async fn last_run(sb: &Sandbox) -> (RunView, Vec<StepView>, String) {
    let (run, log) = sb.last_run();
    let view = RunView {
        status: run["status"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("status"),
        reason: run["reason"].as_str().map(str::to_string),
        params: text_map(&run["params"]),
        trigger: run["trigger"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let steps = run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| StepView {
            status: s["status"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("status"),
            attempt: s["attempt"].as_u64().unwrap_or_default(),
            exit_code: s["exit_code"].as_i64(),
            outputs: text_map(&s["outputs"]),
        })
        .collect();
    (view, steps, log)
}

fn statuses(steps: &[StepView]) -> Vec<StepStatus> {
    steps.iter().map(|s| s.status).collect()
}

#[tokio::test]
async fn hello_example_runs_and_is_recorded() {
    let sb = Sandbox::new();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/hello.yml");
    let out = sb.run(&["run", file.to_str().expect("path"), "--param", "who=tester"]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("Hello, tester!"), "{}", out.stdout);
    assert!(
        out.stdout.contains("greet said: Hello, tester"),
        "outputs flow to later steps: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("✓ hello #1 succeeded"),
        "{}",
        out.stdout
    );
    let (run, steps, log) = last_run(&sb).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.params.get("who").map(String::as_str), Some("tester"));
    assert_eq!(run.trigger, "cli");
    assert!(
        steps.iter().all(|s| s.status == StepStatus::Succeeded),
        "{steps:?}"
    );
    assert_eq!(
        steps[0].outputs.get("message").map(String::as_str),
        Some("Hello, tester")
    );
    assert_eq!(steps[3].attempt, 2, "the flaky step took two attempts");
    assert!(
        log.contains("second attempt works") && log.contains("Hello, tester!"),
        "{log}"
    );
}

#[tokio::test]
async fn failure_skips_later_steps_and_runs_finally() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "f",
        "steps:\n  - run: echo one\n  - run: exit 4\n  - run: echo never\n  - if: failure()\n    run: echo on-failure\nfinally:\n  - run: echo \"finally saw $SKIFF_RUN_STATUS\"\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(
        out.code,
        Some(1),
        "a failed run exits non-zero: {}",
        out.all()
    );
    assert!(!out.stdout.contains("\n  │ never"), "{}", out.stdout);
    assert!(out.stdout.contains("on-failure"));
    assert!(out.stdout.contains("finally saw failed"));
    let (run, steps, _) = last_run(&sb).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.reason
            .as_deref()
            .is_some_and(|r| r.contains("exit code 4")),
        "{:?}",
        run.reason
    );
    assert_eq!(
        statuses(&steps),
        vec![
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::Skipped,
            StepStatus::Succeeded,
            StepStatus::Succeeded
        ]
    );
    assert_eq!(steps[1].exit_code, Some(4));
}

#[tokio::test]
async fn continue_on_error_keeps_the_run_going() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "c",
        "steps:\n  - run: exit 1\n    continue_on_error: true\n  - run: echo after\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let (run, steps, _) = last_run(&sb).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(
        statuses(&steps),
        vec![StepStatus::Failed, StepStatus::Succeeded]
    );
}

#[tokio::test]
async fn step_timeout_kills_grandchildren_and_finally_runs() {
    let sb = Sandbox::new();
    let pidfile = sb.path().join("pids");
    let yaml = format!(
        "steps:\n  - timeout: 1s\n    run: |\n      sleep 1000 &\n      echo $! >> {p}\n      bash -c 'sleep 1000 & echo $! >> {p}; wait' &\n      echo $$ >> {p}\n      sleep 1000\nfinally:\n  - run: echo \"cleanup after $SKIFF_RUN_STATUS\"\n",
        p = pidfile.display()
    );
    let file = sb.pipeline("t", &yaml);
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout.contains("timed out after 1.0s"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("cleanup after failed"),
        "{}",
        out.stdout
    );
    let pids = pids(&pidfile);
    assert!(pids.len() >= 3, "the step wrote its pids: {pids:?}");
    assert!(
        all_gone(&pids),
        "every process of the step is gone: {pids:?}"
    );
    let (_, steps, _) = last_run(&sb).await;
    assert_eq!(
        statuses(&steps),
        vec![StepStatus::TimedOut, StepStatus::Succeeded]
    );
}

#[tokio::test]
async fn background_processes_end_with_their_step() {
    let sb = Sandbox::new();
    let pidfile = sb.path().join("pids");
    let yaml = format!(
        "steps:\n  - run: |\n      sleep 1000 &\n      echo $! > {}\n  - run: echo next\n",
        pidfile.display()
    );
    let file = sb.pipeline("bg", &yaml);
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        all_gone(&pids(&pidfile)),
        "a step's leftover background job is killed"
    );
}

#[tokio::test]
async fn run_timeout_times_the_run_out_and_finally_runs() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "rt",
        "timeout: 1s\nsteps:\n  - run: sleep 1000\n  - run: echo never\nfinally:\n  - run: echo \"status=$SKIFF_RUN_STATUS\"\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stdout.contains("status=timed_out"), "{}", out.stdout);
    let (run, steps, _) = last_run(&sb).await;
    assert_eq!(run.status, RunStatus::TimedOut);
    assert_eq!(
        statuses(&steps),
        vec![
            StepStatus::TimedOut,
            StepStatus::Skipped,
            StepStatus::Succeeded
        ]
    );
}

#[tokio::test]
async fn cancel_stops_the_tree_and_still_runs_finally() {
    let sb = Sandbox::new();
    let pidfile = sb.path().join("pids");
    let yaml = format!(
        "steps:\n  - name: long\n    run: |\n      sleep 1000 &\n      echo $! >> {p}\n      echo $$ >> {p}\n      echo started\n      sleep 1000\n  - run: echo never\nfinally:\n  - name: tidy\n    run: echo \"finally after $SKIFF_RUN_STATUS\"\n",
        p = pidfile.display()
    );
    let file = sb.pipeline("cancel", &yaml);
    let mut live = Live::start(sb.skiff(&["run", file.to_str().expect("path")]));
    live.wait_for("│ started");
    live.signal("INT");
    let (code, out) = live.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("finally after cancelled"), "{out}");
    assert!(out.contains("cancelled in"), "{out}");
    assert!(
        all_gone(&pids(&pidfile)),
        "the cancelled step's processes are gone"
    );
    let (run, steps, _) = last_run(&sb).await;
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(
        statuses(&steps),
        vec![
            StepStatus::Cancelled,
            StepStatus::Skipped,
            StepStatus::Succeeded
        ]
    );
}

#[tokio::test]
async fn cancel_waits_out_the_grace_period_for_a_stubborn_step() {
    let sb = Sandbox::new();
    let file = sb.pipeline("stubborn", "steps:\n  - run: |\n      trap 'echo got TERM' TERM\n      echo ready\n      while true; do sleep 0.05; done\n");
    let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
    cmd.env("SKIFF_KILL_GRACE", "300ms");
    let mut live = Live::start(cmd);
    live.wait_for("│ ready");
    live.signal("TERM");
    let (code, out) = live.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("got TERM"), "SIGTERM comes first: {out}");
    let (run, _, _) = last_run(&sb).await;
    assert_eq!(
        run.status,
        RunStatus::Cancelled,
        "SIGKILL ends what ignores SIGTERM"
    );
}

#[tokio::test]
async fn retries_with_backoff_until_success() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "retry",
        "steps:\n  - retry: { count: 3, backoff: 50ms }\n    run: |\n      n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count\n      echo \"attempt $n\"\n      [ $n -ge 3 ]\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path"), "--keep-workspace"]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("attempt 3") && !out.stdout.contains("attempt 4"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("retrying in 50ms") && out.stdout.contains("retrying in 100ms"),
        "backoff doubles: {}",
        out.stdout
    );
    let (_, steps, _) = last_run(&sb).await;
    assert_eq!(steps[0].attempt, 3);

    let file = sb.pipeline("retry-fail", "steps:\n  - retry: 1\n    run: exit 9\n");
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1));
    let (_, steps, _) = last_run(&sb).await;
    assert_eq!((steps[0].attempt, steps[0].status), (2, StepStatus::Failed));
}

#[tokio::test]
async fn outputs_single_and_multi_line_reach_later_steps() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "out",
        "steps:\n  - id: make\n    run: |\n      echo \"version=1.2.3\" >> \"$SKIFF_OUTPUT\"\n      printf 'notes<<EOF\\nline one\\nline two\\nEOF\\n' >> \"$SKIFF_OUTPUT\"\n  - if: steps.make.outputs.version == '1.2.3'\n    env:\n      V: v${{ steps.make.outputs.version }}\n    run: |\n      echo \"got $V and $SKIFF_STEP_MAKE_VERSION\"\n      echo \"$SKIFF_STEP_MAKE_NOTES\" | wc -l\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("got v1.2.3 and 1.2.3"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("│ 2"),
        "a multi-line output keeps its lines: {}",
        out.stdout
    );
    let (_, steps, _) = last_run(&sb).await;
    assert_eq!(
        steps[0].outputs.get("notes").map(String::as_str),
        Some("line one\nline two")
    );
}

#[tokio::test]
async fn scripts_long_and_short_run_and_leave_no_files_behind() {
    let sb = Sandbox::new();
    // Past 64 KiB a script goes through a file instead of the shell's `-c` argument.
    let padding = "# padding\n".repeat(8 << 10);
    let long =
        format!("{padding}echo \"long script ran\"\necho \"size=big\" >> \"$SKIFF_OUTPUT\"\n");
    let yaml = format!(
        "steps:\n  - id: short\n    run: echo \"short as $0\"\n  - id: long\n    run: |\n{}\n  - run: echo \"long said $SKIFF_STEP_LONG_SIZE\"\n  - id: broken\n    continue_on_error: true\n    run: no-such-command-here\n",
        long.lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(yaml.len() > 64 << 10);
    let file = sb.pipeline("scripts", &yaml);
    let workspaces = sb.data().join("workspaces");
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("short as short"), "{}", out.stdout);
    assert!(out.stdout.contains("long script ran"), "{}", out.stdout);
    assert!(out.stdout.contains("long said big"), "{}", out.stdout);
    assert!(
        out.stdout.contains("broken: line 1: no-such-command-here"),
        "shell errors name the step: {}",
        out.stdout
    );
    let left: Vec<_> = std::fs::read_dir(&workspaces)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn an_output_of_a_failed_attempt_does_not_reach_the_retry() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "retry-out",
        "steps:\n  - id: flaky\n    retry: { count: 1, backoff: 10ms }\n    run: |\n      if [ ! -e marker ]; then touch marker; echo \"stale=yes\" >> \"$SKIFF_OUTPUT\"; exit 1; fi\n      echo \"fresh=yes\" >> \"$SKIFF_OUTPUT\"\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let (_, steps, _) = last_run(&sb).await;
    assert_eq!(steps[0].attempt, 2);
    assert_eq!(
        steps[0].outputs.get("fresh").map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        steps[0].outputs.get("stale"),
        None,
        "{:?}",
        steps[0].outputs
    );
}

#[tokio::test]
async fn secrets_are_masked_even_when_split_across_reads() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "mask",
        "steps:\n  - env:\n      TOKEN: ${{ secrets.API_TOKEN }}\n    run: |\n      echo \"token is $TOKEN\"\n      printf 'split: hunter2'; sleep 0.2; printf -- '-secret-value end\\n'\n      echo \"out=$TOKEN\" >> \"$SKIFF_OUTPUT\"\n      echo \"$SKIFF_SECRET_API_TOKEN|$GITHUB_TOKEN|\" \n",
    );
    let mut cmd = sb.skiff(&["run", file.to_str().expect("path")]);
    cmd.env("SKIFF_SECRET_API_TOKEN", "hunter2-secret-value")
        .env("GITHUB_TOKEN", "worker-credential");
    let out = crate::harness::run_to_end(cmd);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        !out.all().contains("hunter2"),
        "the secret never reaches the terminal: {}",
        out.all()
    );
    assert!(
        out.stdout.contains("token is ***") && out.stdout.contains("split: *** end"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("││\n") || out.stdout.contains("│ ||"),
        "the worker's environment does not reach steps: {}",
        out.stdout
    );
    let (_, steps, log) = last_run(&sb).await;
    assert!(
        !log.contains("hunter2") && log.contains("split: *** end"),
        "the stored log is masked: {log}"
    );
    assert_eq!(
        steps[0].outputs.get("out").map(String::as_str),
        Some("***"),
        "outputs are masked"
    );
}

#[tokio::test]
async fn missing_secret_fails_the_step_clearly() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "nosecret",
        "steps:\n  - env: { T: \"${{ secrets.NOPE }}\" }\n    run: echo hi\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.contains("secret `NOPE` is not provided"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn secrets_file_must_be_private() {
    let sb = Sandbox::new();
    let secrets = sb.path().join("secrets");
    std::fs::write(&secrets, "API_TOKEN=from-the-file\n").expect("write");
    let file = sb.pipeline(
        "sf",
        "steps:\n  - env: { T: \"${{ secrets.API_TOKEN }}\" }\n    run: echo \"t=$T\"\n",
    );
    let out = sb.run(&[
        "run",
        file.to_str().expect("path"),
        "--secrets",
        secrets.to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = sb.run(&[
        "run",
        file.to_str().expect("path"),
        "--secrets",
        secrets.to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("t=***"), "{}", out.stdout);
}

#[tokio::test]
async fn params_with_shell_syntax_stay_inert() {
    let sb = Sandbox::new();
    let marker = sb.path().join("pwned");
    let evil = format!(
        "$(touch {m}); `touch {m}`; touch {m} #'\"",
        m = marker.display()
    );
    let file = sb.pipeline(
        "inject",
        "params:\n  branch: main\nsteps:\n  - env:\n      B: ${{ params.branch }}\n      F: x-${{ format('{0}', params.branch) }}\n    if: params.branch != ''\n    run: |\n      echo \"param: $SKIFF_PARAM_BRANCH\"\n      echo \"env: $B\"\n      echo \"$F\" > /dev/null\n  - uses: http/wait\n    continue_on_error: true\n    with: { url: \"http://127.0.0.1:1/${{ params.branch }}\", timeout: 300ms, interval: 100ms }\n",
    );
    let param = format!("branch={evil}");
    let out = sb.run(&["run", file.to_str().expect("path"), "--param", &param]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains(&format!("param: {evil}")),
        "the param arrives as inert text: {}",
        out.stdout
    );
    assert!(out.stdout.contains(&format!("env: {evil}")));
    assert!(!marker.exists(), "nothing in the param was executed");
}

#[tokio::test]
async fn bad_params_are_refused_before_the_run() {
    let sb = Sandbox::new();
    let file = sb.pipeline("p", "params:\n  mode: { options: [a, b] }\n  n: { type: number, required: true }\nsteps:\n  - run: echo\n");
    let out = sb.run(&[
        "run",
        file.to_str().expect("path"),
        "--param",
        "mode=c",
        "--param",
        "nn=1",
    ]);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.stderr.contains("param `mode`: `c` is not one of: a, b"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("param `nn`: unknown param; did you mean `n`?"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("param `n`: required"), "{}", out.stderr);
    assert!(
        !sb.data().join("skiff.db").exists() || {
            let (status, page) = sb.serve().api("GET", "/api/runs", None);
            status == 200 && page["runs"] == serde_json::json!([])
        },
        "no run is created"
    );
}

#[tokio::test]
async fn http_wait_action_reports_readiness() {
    let sb = Sandbox::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(1) {
            let mut s = stream.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let yaml = format!(
        "steps:\n  - id: up\n    uses: http/wait\n    with: {{ url: \"http://127.0.0.1:{port}/health\", status: 204, timeout: 5s }}\n  - env: {{ S: \"${{{{ steps.up.outputs.status }}}}\" }}\n    run: echo \"status $S\"\n"
    );
    let file = sb.pipeline("wait", &yaml);
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("status 204"), "{}", out.stdout);

    let file = sb.pipeline("down", "steps:\n  - uses: http/wait\n    with: { url: \"http://127.0.0.1:1/\", timeout: 300ms, interval: 50ms }\n");
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout.contains("was not ready within"),
        "{}",
        out.stdout
    );
}
