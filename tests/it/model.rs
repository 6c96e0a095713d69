//! The core model as a user meets it: params are typed in expressions, a param can be left
//! absent (and `""` is not a value where one is required), and the pipeline's trigger policy
//! holds for every way in (API, the UI's form, `skiff run`).

use serde_json::{Value, json};

use crate::api::{csrf_of, sign_in};
use crate::harness::Sandbox;
use crate::harness::{Server, eventually, raw};

fn status_of(run: &Value, id: &str) -> String {
    run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == id)
        .and_then(|s| s["status"].as_str())
        .unwrap_or("missing")
        .to_string()
}

const TYPED: &str = r#"params:
  dry_run: { type: boolean, default: true }
  a: { type: number, default: "10" }
  b: { type: number, default: "9" }
steps:
  - id: dry
    if: params.dry_run
    run: echo DRY
  - id: real
    if: "!params.dry_run"
    run: echo REAL
  - id: is-false
    if: params.dry_run == false
    run: echo IS-FALSE
  - id: bigger
    if: params.a > params.b
    run: echo BIGGER
  - id: text
    run: echo "env=$SKIFF_PARAM_DRY_RUN a=$SKIFF_PARAM_A"
"#;

#[test]
fn a_boolean_param_set_to_false_is_false_and_numbers_compare_as_numbers() {
    let s = Server::start(&[("typed", TYPED)]);
    for given in [json!({ "dry_run": false }), json!({ "dry_run": "false" })] {
        let id = s.trigger("typed", given.clone());
        let run = s.wait_for_end(&id);
        assert_eq!(run["status"], "succeeded", "{run}");
        let got: Vec<String> = ["dry", "real", "is-false", "bigger", "text"]
            .iter()
            .map(|step| status_of(&run, step))
            .collect();
        assert_eq!(
            got,
            [
                "skipped",
                "succeeded",
                "succeeded",
                "succeeded",
                "succeeded"
            ],
            "with {given}: {run}"
        );
        let log = s.log_text(&id);
        assert!(
            !log.contains("DRY\n"),
            "the dry-run step did not run: {log}"
        );
        // The environment stays text.
        assert!(log.contains("env=false a=10"), "{log}");
    }
    // And the default (true) is true.
    let id = s.trigger("typed", json!({}));
    let run = s.wait_for_end(&id);
    assert_eq!(
        (status_of(&run, "dry"), status_of(&run, "real")),
        ("succeeded".into(), "skipped".into())
    );
}

#[test]
fn skiff_run_sees_typed_params_too() {
    let sb = Sandbox::new();
    let file = sb.pipeline("typed", TYPED);
    let out = sb.run(&[
        "run",
        file.to_str().expect("path"),
        "--param",
        "dry_run=false",
        "--param",
        "a=100",
        "--param",
        "b=20",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let all = out.all();
    assert!(all.contains("REAL") && all.contains("BIGGER"), "{all}");
    assert!(!all.contains("DRY\n"), "{all}");
}

const FORM: &str = r#"params:
  who: { required: true }
  mode: { type: choice, options: [fast, slow], required: true }
  n: { type: number, description: an optional number }
  note: { default: "x" }
steps:
  - run: echo "who=[$SKIFF_PARAM_WHO] mode=[$SKIFF_PARAM_MODE] n=[$SKIFF_PARAM_N] note=[$SKIFF_PARAM_NOTE]"
  - if: params.n == null
    run: echo N-IS-ABSENT
"#;

#[test]
fn a_param_can_be_absent_and_empty_is_not_a_value_where_one_is_required() {
    let s = Server::start(&[("form", FORM)]);
    // An optional number left empty (as a form sends it) or null is absent; null leaves the
    // default in place.
    for n in [json!(""), Value::Null] {
        let id = s.trigger(
            "form",
            json!({ "who": "me", "mode": "fast", "n": n, "note": null }),
        );
        let run = s.wait_for_end(&id);
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(
            run["params"],
            json!({ "who": "me", "mode": "fast", "note": "x" })
        );
        let log = s.log_text(&id);
        assert!(
            log.contains("who=[me] mode=[fast] n=[] note=[x]") && log.contains("N-IS-ABSENT"),
            "{log}"
        );
    }
    // A required string given as "" is missing, and the error names it.
    let (status, body) = s.api(
        "POST",
        "/api/pipelines/form/runs",
        Some(r#"{"params": {"who": "", "mode": "fast"}}"#),
    );
    assert_eq!(status, 422, "{body}");
    let fields = body["error"]["fields"].as_array().expect("fields");
    assert_eq!(fields.len(), 1, "{body}");
    assert_eq!(fields[0]["param"], "who");
    assert!(
        fields[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("required")),
        "{body}"
    );
    // An optional string may be set to "" on purpose.
    let id = s.trigger("form", json!({ "who": "me", "mode": "slow", "note": "" }));
    assert_eq!(s.wait_for_end(&id)["params"]["note"], "");

    // The form: a required choice without a default is not preselected.
    let cookie = sign_in(&s);
    let (status, _, page) = raw(
        "GET",
        &s.url("/pipelines/form"),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!(status, 200);
    assert!(
        page.contains(r#"<option value="" selected disabled>choose one</option>"#),
        "{page}"
    );
    assert!(!page.contains(r#"value="fast" selected"#), "{page}");
    let csrf = csrf_of(&page);
    let form = [
        ("cookie", cookie.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    // Sent without choosing: refused, the error beside the field, the rest kept.
    let (status, _, page) = raw(
        "POST",
        &s.url("/pipelines/form/run"),
        Some(&format!(
            "csrf={csrf}&param.who=me&param.mode=&param.n=&param.note=x"
        )),
        &form,
    );
    assert_eq!(status, 422, "{page}");
    let beside = page
        .split(r#"id="error-mode">"#)
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_default();
    assert!(beside.contains("required"), "{page}");
    assert!(
        !page.contains(r#"id="error-n""#),
        "an empty optional number is fine"
    );
    assert!(page.contains(r#"name="param.who" value="me""#), "{page}");
    // Chosen, with the optional number left empty: the run starts.
    let (status, headers, page) = raw(
        "POST",
        &s.url("/pipelines/form/run"),
        Some(&format!(
            "csrf={csrf}&param.who=me&param.mode=slow&param.n=&param.note=x"
        )),
        &form,
    );
    assert_eq!(status, 303, "{page}");
    let location = headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .expect("a redirect to the run");
    let id = location.trim_start_matches("/runs/");
    let run = s.wait_for_end(id);
    assert_eq!(
        run["params"],
        json!({ "who": "me", "mode": "slow", "note": "x" })
    );
}

const NIGHTLY: &str = r#"on:
  manual: false
  schedule:
    - cron: "0 3 * * *"
steps:
  - run: echo TEARDOWN
"#;

#[test]
fn a_pipeline_that_turns_manual_runs_off_refuses_them_from_every_way_in() {
    let s = Server::start(&[("nightly", NIGHTLY)]);
    let (status, body) = s.api("POST", "/api/pipelines/nightly/runs", Some("{}"));
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "manual_disabled");
    // The UI's form route, posted directly (the page shows no Run button).
    let cookie = sign_in(&s);
    let (_, _, page) = raw(
        "GET",
        &s.url("/pipelines/nightly"),
        None,
        &[("cookie", &cookie)],
    );
    assert!(page.contains("Manual runs are off"), "{page}");
    let csrf = csrf_of(&page);
    let (status, _, page) = raw(
        "POST",
        &s.url("/pipelines/nightly/run"),
        Some(&format!("csrf={csrf}")),
        &[
            ("cookie", cookie.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(status, 409, "{page}");
    assert!(page.contains("does not accept manual runs"), "{page}");
    let (_, runs) = s.api("GET", "/api/runs?pipeline=nightly", None);
    assert_eq!(runs["runs"], json!([]), "no run was made: {runs}");
    // `skiff run` on the file.
    let sb = Sandbox::new();
    let file = sb.pipeline("nightly", NIGHTLY);
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("does not accept cli runs"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("TEARDOWN"), "{}", out.all());
}

/// An action's `with` is its typed struct: a param that does not fit it fails the step at once
/// (bad inputs are not retried), a nested or out-of-range literal is a load error, and an
/// action asked to stop ends on its own (no "abandoned" note).
#[test]
fn actions_check_their_inputs_and_stop_when_asked() {
    let yaml = r#"params:
  u: { default: "https://example.com/" }
  s: { type: number, default: "204" }
steps:
  - id: bad-url
    uses: http/wait
    retry: { count: 3, backoff: 1s }
    continue_on_error: true
    with: { url: "${{ params.u }}", timeout: 1s }
  - id: typed
    uses: http/wait
    continue_on_error: true
    with: { url: "http://127.0.0.1:1/", status: "${{ params.s }}", timeout: 200ms, interval: 50ms }
  - id: long
    uses: http/wait
    with: { url: "http://127.0.0.1:1/", timeout: 10m, interval: 100ms }
"#;
    let s = Server::start(&[("waits", yaml)]);
    let id = s.trigger("waits", json!({}));
    s.wait_for_log(&id, "http://127.0.0.1:1/: ");
    eventually("the long wait has started", || {
        let (_, run) = s.api("GET", &format!("/api/runs/{id}"), None);
        status_of(&run, "long") == "running"
    });
    let (status, _) = s.api("POST", &format!("/api/runs/{id}/cancel"), None);
    assert_eq!(status, 202);
    let run = s.wait_for_end(&id);
    assert_eq!(run["status"], "cancelled", "{run}");
    let step = |i: usize| &run["steps"][i];
    assert_eq!(step(0)["status"], "failed");
    assert_eq!(step(0)["attempt"], 1, "bad inputs are not retried: {run}");
    assert!(
        step(0)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("with.url") && r.contains("plain http://")),
        "{run}"
    );
    // A number param in a number field: the wait ran (and timed out against a closed port).
    assert_eq!(step(1)["status"], "failed");
    assert!(
        step(1)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not ready within")),
        "{run}"
    );
    assert_eq!(step(2)["status"], "cancelled");
    let log = s.log_text(&id);
    assert!(
        !log.contains("abandoned"),
        "the wait stopped when asked: {log}"
    );

    // Load time: a nested or unknown field, a status out of range, named with line and column.
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "bad",
        "steps:\n  - uses: http/wait\n    with: { url: \"http://x/\", status: 70000, health: { http: x } }\n",
    );
    let out = sb.run(&["validate", file.to_str().expect("path")]);
    assert_ne!(out.code, Some(0));
    let all = out.all();
    assert!(
        all.contains("bad.yml:3:39") && all.contains("not an HTTP status"),
        "{all}"
    );
    assert!(
        all.contains("unknown field `health` for `http/wait`"),
        "{all}"
    );
}
