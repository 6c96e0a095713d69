//! Records that tell the truth: runs interrupted by a crash or a stop end with every step in a
//! final state and their `finally` steps run; queued runs keep their order across a restart; logs
//! come back exactly as written; retention deletes old runs with their logs; the database's
//! write-ahead log does not stay large.

use serde_json::{Value, json};

use crate::harness::Server;
use crate::harness::{Sandbox, alive, all_gone, pids};

/// The steps of a run as (id, status, reason).
fn steps_of(run: &Value) -> Vec<(String, String, String)> {
    run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or("").to_string(),
                s["status"].as_str().unwrap_or("").to_string(),
                s["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_crash_during_a_step_ends_every_record_and_runs_finally_after_the_restart() {
    let scratch = crate::harness::scratch();
    let pidfile = scratch.path().join("pids");
    let marker = scratch.path().join("cleaned");
    // Written by more than one run, each a user of its own.
    crate::harness::shared_file(&pidfile);
    let yaml = format!(
        r#"steps:
  - id: prepare
    run: echo "token=abc123" >> "$SKIFF_OUTPUT"
  - id: work
    run: |
      echo $$ >> {p}
      setsid sleep 1000 &
      echo $! >> {p}
      echo started
      sleep 1000
  - id: never
    run: echo never
finally:
  - id: cleanup
    env: {{ TOKEN: "${{{{ steps.prepare.outputs.token }}}}" }}
    run: echo "cleaned $TOKEN after a $SKIFF_RUN_STATUS run" >> {m}
"#,
        p = pidfile.display(),
        m = marker.display()
    );
    let s = Server::start_with(
        &[("long", &yaml), ("quick", "steps:\n  - run: echo quick\n")],
        &[("SKIFF_WORKERS", "1")],
    );
    let id = s.trigger("long", json!({}));
    s.wait_for_log(&id, "started");
    // With the one worker slot busy, this run waits in the queue when skiff dies.
    let waiting = s.trigger("quick", json!({}));
    let mut s = s;
    s.crash();
    let left = pids(&pidfile);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|p| alive(*p)),
        "a crash leaves the step's processes running"
    );
    assert!(!marker.exists(), "finally did not run before the crash");

    let s = s.restart();
    let run = s.wait_for_end(&id);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("interrupted") && r.contains("finally")),
        "{run}"
    );
    let steps = steps_of(&run);
    let status: Vec<(&str, &str)> = steps
        .iter()
        .map(|(id, st, _)| (id.as_str(), st.as_str()))
        .collect();
    assert_eq!(
        status,
        [
            ("prepare", "succeeded"),
            ("work", "failed"),
            ("never", "skipped"),
            ("cleanup", "succeeded")
        ],
        "{run}"
    );
    assert!(steps[1].2.starts_with("interrupted"), "{run}");
    assert!(
        run["steps"].as_array().is_some_and(|s| s
            .iter()
            .all(|s| !s["finished_at"].is_null() || s["status"] == "skipped")),
        "every step that started has an end time: {run}"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the finally step ran"),
        "cleaned abc123 after a failed run\n",
        "finally ran after the restart, with the outputs stored before the crash"
    );
    assert!(
        all_gone(&left),
        "the step processes the crash left behind (one in a session of its own) are ended"
    );
    assert_eq!(
        s.wait_for_end(&waiting)["status"],
        "succeeded",
        "a run that was waiting runs after the restart"
    );
    // The restarted server runs and cancels runs as usual.
    let again = s.trigger("long", json!({}));
    s.wait_for_log(&again, "started");
    let (status, _) = s.api("POST", &format!("/api/runs/{again}/cancel"), None);
    assert_eq!(status, 202);
    assert_eq!(s.wait_for_end(&again)["status"], "cancelled");
}

#[test]
fn a_crash_during_a_finally_step_runs_it_again_after_the_restart() {
    let scratch = crate::harness::scratch();
    let marker = scratch.path().join("attempts");
    let pidfile = scratch.path().join("pids");
    // Written before and after the restart, perhaps as two different users.
    crate::harness::shared_file(&marker);
    let yaml = format!(
        r#"steps:
  - run: echo main
finally:
  - id: teardown
    run: |
      echo attempt >> {m}
      if [ "$(wc -l < {m})" -eq 1 ]; then echo $$ >> {p}; echo tearing-down; sleep 1000; fi
      echo torn down
"#,
        m = marker.display(),
        p = pidfile.display()
    );
    let mut s = Server::start(&[("tear", &yaml)]);
    let id = s.trigger("tear", json!({}));
    s.wait_for_log(&id, "tearing-down");
    s.crash();
    let left = pids(&pidfile);
    assert!(left.iter().all(|p| alive(*p)), "{left:?}");
    let s = s.restart();
    let run = s.wait_for_end(&id);
    assert!(all_gone(&left), "the first start's process is ended");
    assert_eq!(run["status"], "failed", "{run}");
    let steps = steps_of(&run);
    assert_eq!(steps[0].1, "succeeded", "{run}");
    assert_eq!(steps[1].1, "succeeded", "the finally step ran again: {run}");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        "attempt\nattempt\n",
        "a finally step that was running when skiff died starts once more"
    );
    let text = s.log_text(&id);
    assert!(
        text.contains("was running when skiff stopped; it runs again"),
        "{text}"
    );
}

#[test]
fn stopping_stops_a_finally_step_that_outlasts_the_wait_and_says_so() {
    let scratch = crate::harness::scratch();
    let pidfile = scratch.path().join("pids");
    let yaml = format!(
        r#"steps:
  - run: echo started; sleep 1000
finally:
  - id: slow
    run: |
      echo $$ >> {p}
      setsid sleep 1000 &
      echo $! >> {p}
      echo cleaning
      sleep 1000
"#,
        p = pidfile.display()
    );
    let mut s = Server::start_with(&[("slow", &yaml)], &[("SKIFF_STOP_WAIT", "1s")]);
    let id = s.trigger("slow", json!({}));
    s.wait_for_log(&id, "started");
    s.stop();
    let left = pids(&pidfile);
    assert_eq!(
        left.len(),
        2,
        "the finally step started before the stop wait ended"
    );
    assert!(all_gone(&left), "no step process outlives a stopped skiff");
    let s = s.restart();
    let (_, run) = s.api("GET", &format!("/api/runs/{id}"), None);
    assert_eq!(run["status"], "cancelled", "{run}");
    assert!(
        run["reason"]
            .as_str()
            .is_some_and(|r| r.contains("stopped the finally steps")),
        "{run}"
    );
    let steps = steps_of(&run);
    assert_eq!(steps[0].1, "cancelled", "{run}");
    assert_eq!(steps[1].1, "cancelled", "{run}");
    assert!(steps[1].2.contains("stopped before it ended"), "{run}");
}

#[test]
fn runs_waiting_when_skiff_stops_start_in_their_order_after_the_restart() {
    let scratch = crate::harness::scratch();
    let order = scratch.path().join("order");
    // Each run is a user of its own: the file they all append to is open to all.
    crate::harness::shared_file(&order);
    let quick = format!(
        "steps:\n  - run: echo $SKIFF_RUN_NUMBER >> {}\n",
        order.display()
    );
    // Two slots, both busy; stopping takes a while (one run's finally step sleeps), and the
    // slot freed meanwhile takes jobs off the queue that it may not start.
    let mut s = Server::start_with(
        &[
            ("long", "steps:\n  - run: echo started; sleep 1000\n"),
            (
                "slowstop",
                "steps:\n  - run: echo started; sleep 1000\nfinally:\n  - run: sleep 2\n",
            ),
            ("quick", &quick),
        ],
        &[("SKIFF_WORKERS", "2")],
    );
    let long = s.trigger("long", json!({}));
    s.wait_for_log(&long, "started");
    let slow = s.trigger("slowstop", json!({}));
    s.wait_for_log(&slow, "started");
    let waiting: Vec<String> = (0..6).map(|_| s.trigger("quick", json!({}))).collect();
    s.stop();
    // One slot after the restart, so that runs also end in the order they start.
    let s = s.restart_with(&[("SKIFF_WORKERS", "1")]);
    for id in &waiting {
        assert_eq!(s.wait_for_end(id)["status"], "succeeded");
    }
    assert_eq!(
        std::fs::read_to_string(&order).expect("order"),
        "1\n2\n3\n4\n5\n6\n",
        "waiting runs start in the order they were created"
    );
}

#[test]
fn logs_come_back_exactly_as_written_in_pages_and_live() {
    // A 600 KB line of a three-byte character, then an ordinary line.
    let s = Server::start(&[(
        "euro",
        "steps:\n  - run: |\n      printf '€%.0s' $(seq 200000); echo\n      echo after\n",
    )]);
    let expected = format!("{}\nafter\n", "€".repeat(200_000));
    let id = s.trigger("euro", json!({}));
    let mut live = String::new();
    let mut stream =
        crate::harness::EventStream::open(&s.url(&format!("/api/runs/{id}/logs/stream")), None);
    while let Some((name, _, data)) = stream.next() {
        match name.as_str() {
            "log" => live.push_str(data["text"].as_str().expect("text")),
            "end" => break,
            _ => {}
        }
    }
    assert!(
        live == expected,
        "the live log differs ({} bytes, {} U+FFFD)",
        live.len(),
        live.matches('\u{fffd}').count()
    );
    for limit in [1000, 4097, 65_536, 100_001] {
        let mut paged = String::new();
        let mut offset = 0u64;
        loop {
            let (status, page) = s.api(
                "GET",
                &format!("/api/runs/{id}/logs?offset={offset}&limit={limit}"),
                None,
            );
            assert_eq!(status, 200, "{page}");
            for chunk in page["chunks"].as_array().expect("chunks") {
                paged.push_str(chunk["text"].as_str().expect("text"));
            }
            let next = page["next_offset"].as_u64().expect("next_offset");
            if next == page["len"].as_u64().expect("len") {
                break;
            }
            assert!(next > offset, "a page moves on");
            offset = next;
        }
        assert!(
            paged == expected,
            "pages of {limit} bytes differ ({} bytes, {} U+FFFD)",
            paged.len(),
            paged.matches('\u{fffd}').count()
        );
    }
}

#[test]
fn retention_deletes_old_runs_with_their_logs() {
    let mut s = Server::start(&[
        ("kept", "steps:\n  - run: echo kept\n"),
        (
            "short",
            "retention: { max_runs: 1 }\nsteps:\n  - run: echo short\n",
        ),
    ]);
    let kept: Vec<String> = (0..4).map(|_| s.trigger("kept", json!({}))).collect();
    let short: Vec<String> = (0..3).map(|_| s.trigger("short", json!({}))).collect();
    for id in kept.iter().chain(&short) {
        assert_eq!(s.wait_for_end(id)["status"], "succeeded");
    }
    let logs = s.data_dir().join("logs");
    for id in kept.iter().chain(&short) {
        assert!(logs.join(format!("{id}.log")).exists());
    }
    s.stop();
    // The server's default keeps 2 runs of each pipeline; `short` keeps 1 of its own.
    let s = s.restart_with(&[("SKIFF_RETENTION_MAX_RUNS", "2")]);
    crate::harness::eventually("retention runs at start", || {
        s.api("GET", &format!("/api/runs/{}", kept[1]), None).0 == 404
    });
    for (ids, keep) in [(&kept, 2), (&short, 1)] {
        for (i, id) in ids.iter().enumerate() {
            let gone = i < ids.len() - keep;
            crate::harness::eventually("retention deletes the oldest runs", || {
                let (status, _) = s.api("GET", &format!("/api/runs/{id}"), None);
                status == if gone { 404 } else { 200 }
            });
            assert_eq!(
                !logs.join(format!("{id}.log")).exists(),
                gone,
                "a deleted run's log file goes with it"
            );
        }
    }
    // Numbers are not given again.
    let next = s.trigger("kept", json!({}));
    assert_eq!(s.wait_for_end(&next)["number"], 5);
}

#[test]
fn the_write_ahead_log_is_cut_back_and_gone_after_a_clean_stop() {
    let mut s = Server::start(&[("t", "steps:\n  - run: 'true'\n")]);
    let wal = s.data_dir().join("skiff.db-wal");
    // A burst of runs from several clients grows the write-ahead log.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let ids: Vec<String> = (0..100).map(|_| s.trigger("t", json!({}))).collect();
                for id in ids {
                    assert_eq!(s.wait_for_end(&id)["status"], "succeeded");
                }
            });
        }
    });
    // The log is cut back when it starts over after a checkpoint, at the next write.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let last = s.trigger("t", json!({}));
    s.wait_for_end(&last);
    let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert!(
        size <= 4 << 20,
        "the write-ahead log is {size} bytes after the burst"
    );
    s.stop();
    let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(size, 0, "a clean stop leaves no write-ahead log behind");
}

#[test]
fn a_step_skipped_after_a_failure_says_so_and_outputs_have_limits() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "skips",
        r#"params:
  mode: { default: fast }
steps:
  - id: breaks
    run: exit 3
  - id: guarded
    if: params.mode == 'fast'
    run: echo guarded
  - id: plain
    run: echo plain
  - id: later
    if: failure()
    run: echo later
"#,
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    let run = last_run(&sb);
    let steps = steps_of(&run);
    assert_eq!(steps[1].1, "skipped");
    assert_eq!(
        steps[1].2, "not run: step `exit 3` failed with exit code 3",
        "a step whose condition holds is skipped because of the failure, not its `if`"
    );
    assert_eq!(steps[2].2, "not run: step `exit 3` failed with exit code 3");
    assert_eq!(steps[3].1, "succeeded");

    // At most 1,000 outputs per step: more fail the step, with the limit in the reason, quickly
    // (50,000 outputs used to take seconds to parse and held up the next step).
    let file = sb.pipeline(
        "outputs",
        r#"steps:
  - id: many
    run: |
      seq 1 50000 | sed 's/.*/k&=v/' >> "$SKIFF_OUTPUT"
  - id: enough
    run: |
      seq 1 1000 | sed 's/.*/k&=v/' >> "$SKIFF_OUTPUT"
"#,
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    let run = last_run(&sb);
    let steps = steps_of(&run);
    assert_eq!(steps[0].1, "failed");
    assert!(
        steps[0].2.contains("50000 outputs") && steps[0].2.contains("1000 per step"),
        "{:?}",
        steps[0]
    );
    let file = sb.pipeline(
        "fits",
        "steps:\n  - id: enough\n    run: seq 1 1000 | sed 's/.*/k&=v/' >> \"$SKIFF_OUTPUT\"\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(
        last_run(&sb)["steps"][0]["outputs"]
            .as_object()
            .map(|o| o.len()),
        Some(1000)
    );
}

/// The newest run in a sandbox's data folder, with its steps, as the API would show it.
fn last_run(sb: &Sandbox) -> Value {
    sb.last_run().0
}

#[test]
fn a_cancel_after_the_main_steps_stops_nothing_and_changes_nothing() {
    let s = Server::start(&[(
        "late",
        "steps:\n  - run: echo main\nfinally:\n  - run: echo in-finally; sleep 1; echo finally-done\n",
    )]);
    let id = s.trigger("late", json!({}));
    s.wait_for_log(&id, "in-finally");
    let (status, body) = s.api("POST", &format!("/api/runs/{id}/cancel"), None);
    assert_eq!(status, 202, "{body}");
    let run = s.wait_for_end(&id);
    assert_eq!(
        (&run["status"], &run["reason"], &run["cancel_requested"]),
        (&json!("succeeded"), &Value::Null, &json!(true)),
        "the run ends as it would have, and its status and reason agree: {run}"
    );
    assert_eq!(
        steps_of(&run)[1].1,
        "succeeded",
        "the finally step was not stopped"
    );
    let text = s.log_text(&id);
    assert!(text.contains("finally-done"), "{text}");
    assert!(
        text.contains("a cancel was requested while the finally steps ran; nothing was stopped"),
        "{text}"
    );
}

#[test]
fn a_server_leaves_a_live_skiff_run_alone_and_finishes_it_when_it_dies() {
    let sb = Sandbox::new();
    let pidfile = sb.path().join("pids");
    let marker = sb.path().join("cleaned");
    let file = sb.pipeline(
        "cli",
        &format!(
            "steps:\n  - run: |\n      echo $$ >> {p}\n      echo started\n      sleep 1000\nfinally:\n  - run: echo cleaned >> {m}\n",
            p = pidfile.display(),
            m = marker.display()
        ),
    );
    let mut cli = sb.skiff(&["run", file.to_str().expect("path")]);
    cli.env("SKIFF_LEASE", "1s");
    let mut cli = crate::harness::Live::start(cli);
    cli.wait_for("started");
    let data = sb.data();
    let data = data.to_str().expect("data path");
    let s = Server::start_with(&[], &[("SKIFF_DATA", data), ("SKIFF_LEASE", "1s")]);
    // Longer than the lease: the CLI renews its claim, so the server leaves its run alone.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let step = pids(&pidfile);
    assert!(step.iter().all(|p| alive(*p)), "the CLI's step still runs");
    let (_, page) = s.api("GET", "/api/runs?status=running", None);
    assert_eq!(page["runs"].as_array().map(Vec::len), Some(1), "{page}");
    let id = page["runs"][0]["id"].as_str().expect("id").to_string();
    assert!(!marker.exists());

    // A second server on the same data folder is refused.
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"));
    second
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SKIFF_DATA", data)
        .current_dir(sb.path());
    let out = crate::harness::run_to_end(second);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.stderr.contains("another `skiff serve` is running"),
        "{}",
        out.all()
    );

    // The CLI dies without a word: once its claim runs out the server finishes its run.
    let _ = cli.child.kill();
    let _ = cli.child.wait();
    let run = s.wait_for_end(&id);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("worker lost") && r.contains("another worker")),
        "the reason names what happened: {run}"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the finally step ran"),
        "cleaned\n"
    );
    assert!(all_gone(&step), "the dead CLI's step process is ended");
}
