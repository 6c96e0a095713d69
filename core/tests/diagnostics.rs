//! The loader's diagnostics over many small bad inputs, as snapshots of what `skiff validate`
//! prints.

use skiff_core::diag::Report;
use skiff_core::pipeline::load;

fn render(source: &str) -> String {
    match load(source, "case") {
        Ok(_) => "(valid)".to_string(),
        Err(diags) => Report {
            file: "case.yml",
            source,
            diagnostics: &diags,
        }
        .to_string(),
    }
}

macro_rules! cases {
    ($($name:ident: $src:expr;)*) => {
        $(
            #[test]
            fn $name() {
                insta::assert_snapshot!(stringify!($name), render($src));
            }
        )*
    };
}

cases! {
    syntax_error: "steps:\n  - run: echo hi\n   bad: [\n";
    unclosed_flow: "steps: [ { run: x }\n";
    unknown_top_key: "name: demo\nstpes:\n  - run: echo hi\n";
    unknown_step_key: "steps:\n  - run: echo hi\n    retries: 2\n";
    missing_steps: "name: demo\n";
    empty_steps: "steps: []\n";
    wrong_types: "name: [a, b]\ntimeout: 5\nsteps:\n  - run: [echo]\n    continue_on_error: maybe\n";
    yaml11_booleans: "on:\n  manual: yes\nsteps:\n  - run: echo hi\n    continue_on_error: NO\n";
    run_and_uses: "steps:\n  - run: echo hi\n    uses: http/wait\n";
    neither_run_nor_uses: "steps:\n  - name: nothing\n";
    unknown_action: "steps:\n  - uses: http/wiat\n    with: { url: http://x }\n";
    unknown_with_field: "steps:\n  - uses: http/wait\n    with:\n      url: http://127.0.0.1/\n      statsu: 200\n";
    missing_required_with: "steps:\n  - uses: http/wait\n    with: { status: 200 }\n";
    with_wrong_type: "steps:\n  - uses: http/wait\n    with: { url: http://x/, status: ok, timeout: soon }\n";
    duplicate_step_ids: "steps:\n  - id: build\n    run: make\n  - id: build\n    run: make again\n";
    duplicate_keys: "steps:\n  - run: a\n    run: b\n";
    unknown_param_ref: "params:\n  who: world\nsteps:\n  - run: echo\n    env:\n      WHO: ${{ params.woh }}\n";
    unknown_step_ref: "steps:\n  - id: a\n    run: echo\n  - run: echo\n    if: steps.b.outputs.x == 'y'\n";
    later_step_ref: "steps:\n  - run: echo\n    if: ${{ steps.later.status == 'succeeded' }}\n  - id: later\n    run: echo\n";
    unknown_action_output: "steps:\n  - id: wait\n    uses: http/wait\n    with: { url: http://x/ }\n  - run: echo\n    env: { S: \"${{ steps.wait.outputs.code }}\" }\n";
    unknown_root: "steps:\n  - run: echo\n    env: { X: \"${{ parms.x }}\" }\n";
    unknown_function: "steps:\n  - run: echo\n    if: startswith('a', 'b') && lenght('x')\n";
    status_fn_outside_if: "env:\n  X: ${{ failure() }}\nsteps:\n  - run: echo\n";
    expr_syntax_errors: "steps:\n  - run: echo\n    if: ${{ github.ref = 'main' }}\n  - run: echo\n    env:\n      A: ${{ 'unterminated }}\n      B: \"${{ (1 == 1 }}\"\n      C: ${{ }}\n";
    expr_in_run: "params:\n  branch: main\nsteps:\n  - run: |\n      echo building\n      git checkout ${{ params.branch }}\n      curl -H \"$T\" ${{ secrets.TOKEN }}\n";
    bad_durations: "timeout: 30\nsteps:\n  - run: echo\n    timeout: 5 minutes\n    retry: { count: 2, backoff: 1x }\n";
    bad_cron: "on:\n  schedule:\n    - cron: \"0 2 * *\"\n    - cron: \"61 * * * *\"\n      timezone: Europe/Madird\n    - cron: \"@dialy\"\nsteps:\n  - run: echo\n";
    stop_needs_one_target: "steps:\n  - uses: docker/stop\n    with: { remove: true }\n  - uses: docker/stop\n    with: { name: web, temporary: true }\n  - uses: docker/stop\n    with: { temporary: false }\n";
    bad_missed_policy: "on:\n  schedule:\n    - { cron: \"0 2 * * *\", missed: twice }\nsteps:\n  - run: x\n";
    good_cron: "on:\n  schedule:\n    - cron: \"0 2 * * *\"\n      timezone: Europe/Madrid\n    - \"@daily\"\n    - cron: \"*/5 * * * 1-5\"\n    - cron: \"30 0 2 * * *\"\nsteps:\n  - run: echo\n";
    six_field_cron_errors: "on:\n  schedule:\n    - cron: \"61 0 2 * * *\"\n    - cron: \"0 0 0 2 * * *\"\nsteps:\n  - run: echo\n";
    if_constants: "steps:\n  - run: echo\n    if: 42\n  - run: echo\n    if: \"0\"\n  - run: echo\n    if: ${{ 'deploy' }}\n  - run: echo\n    if: \"${{ null }}\"\n  - run: echo\n    if: yes\n  - run: echo\n    if: \"  ${{ 1.5 }}\"\n";
    if_booleans_and_expressions: "steps:\n  - run: echo\n    if: false\n  - run: echo\n    if: ${{ true }}\n  - run: echo\n    if: \"'a' == 'a'\"\n";
    working_directory_escapes: "params:\n  dir: x\nsteps:\n  - run: echo\n    working_directory: /etc\n  - run: echo\n    working_directory: ../../..\n  - run: echo\n    working_directory: sub/../../b\n  - run: echo\n    working_directory: out/${{ params.dir }}\n  - run: echo\n    working_directory: \"\"\n  - run: echo\n    working_directory: sub/dir\n";
    http_wait_literals: "params:\n  u: http://127.0.0.1/\n  s: 200\nsteps:\n  - uses: http/wait\n    with: { url: \"file:///etc/passwd\", status: 70000 }\n  - uses: http/wait\n    with: { url: \"https://example.com/\", status: 99 }\n  - uses: http/wait\n    with: { url: \"http://\", status: 600 }\n  - uses: http/wait\n    with: { url: \"${{ params.u }}\", status: \"${{ params.s }}\" }\n  - uses: http/wait\n    with: { url: \"http://127.0.0.1:8080/health\", status: 204 }\n";
    on_yes: "on: yes\nsteps:\n  - run: echo\n";
    on_no: "on: no\nsteps:\n  - run: echo\n";
    on_false: "on: false\nsteps:\n  - run: echo\n";
    yaml11_booleans_everywhere: "on:\n  manual: Off\n  schedule: [{ cron: \"@daily\", params: { dry: y } }]\nparams:\n  dry: { type: boolean, default: yes, required: NO }\nsteps:\n  - run: echo\n    continue_on_error: on\n";
    nul_in_quoted_scalar: "steps:\n  - run: \"echo a\0b\"\n";
    nul_in_plain_scalar: "name: demo\nsteps:\n  - run: echo \0\n";
    tab_indent_after_value: "steps:\n  - id: a\t\n\trun: echo\n";
    tab_indent_after_key: "name: x\n\tsteps:\n  - run: echo\n";
    tab_indent_in_env: "env:\n  A: b\n  \t B: c\nsteps:\n  - run: echo\n";
    retention_problems: "retention:\n  max_age: 30m\n  max_runs: 0\n  keep: all\nsteps:\n  - run: echo\n";
    retention_out_of_range: "retention:\n  max_age: 3651d\n  max_runs: -1\nsteps:\n  - run: echo\n";
    retention_not_a_mapping: "retention: 30d\nsteps:\n  - run: echo\n";
    retention_age_forms: "retention: { max_age: 30 }\nsteps:\n  - run: echo\n";
    bad_param_defaults: "params:\n  env:\n    options: [dev, prod]\n    default: staging\n  flag: { type: boolean, default: yes }\n  n: { type: number, default: many }\n  t: { type: strnig }\nsteps:\n  - run: echo\n";
    webhook_problems: "on:\n  webhook:\n    secret: hunter2\n    events: [psuh]\nsteps:\n  - run: echo\n";
    webhook_event_scope: "params:\n  sha: {}\n  ref: {}\non:\n  webhook:\n    hook: my repo\n    secret: \"${{ secrets.HOOK }}\"\n    events: [push, ping]\n    branches: [\"!\"]\n    if: ${{ event.brnach == 'main' && success() }}\n    params:\n      sha: ${{ event.sha }}\n      ref: ${{ params.sha }}\n      tag: ${{ event.tag }}\nenv: { X: \"${{ event.ref }}\" }\nsteps:\n  - run: echo \"${{ event.payload.x }}\"\n";
    webhook_without_secret: "on:\n  webhook: { events: [push] }\nsteps:\n  - run: echo\n";
    env_problems: "env:\n  1BAD: x\n  SKIFF_X: y\n  OK: [a]\nsteps:\n  - run: echo\n    env: { Y: \"${{ env.MISSING }}\" }\n";
    bad_step_id: "steps:\n  - id: 9lives\n    run: echo\n";
    bad_name: "name: has spaces\nsteps:\n  - run: echo\n";
    multiple_documents: "steps:\n  - run: a\n---\nsteps:\n  - run: b\n";
    not_a_mapping: "- run: echo\n";
    tags_refused: "steps:\n  - run: !!binary aGk=\n";
    merge_keys_refused: "x: &base { run: echo }\nsteps:\n  - <<: *base\n";
    alias_bomb: "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
    many_problems_at_once: "nmae: x\nparams:\n  tag: { default: latest }\nsteps:\n  - id: a\n    run: echo ${{ params.tag }}\n    timeout: forever\n  - uses: docker/nope\n  - run: echo\n    if: ${{ params.tga == 'x' }}\nfinally:\n  - id: a\n    run: echo\n";
    valid_full: "name: full\ndescription: everything\non:\n  manual: true\n  webhook: { hook: repo, secret: \"${{ secrets.HOOK }}\", events: [push, tag], branches: [main, \"release/**\"], tags: [\"v*\"], paths: [\"src/**\", \"!docs/**\"], if: \"event.payload.repository.private == false\", params: { tag: \"${{ event.tag }}\" } }\n  schedule: [{ cron: \"0 2 * * *\", timezone: UTC, params: { tag: nightly } }]\nparams:\n  tag: { default: latest, description: Image tag }\n  mode: { options: [fast, slow], default: fast }\nenv: { APP: demo }\nruns_on: [docker]\nconcurrency: deploy-${{ params.tag }}\ntimeout: 30m\nsteps:\n  - id: build\n    run: echo \"$SKIFF_PARAM_TAG\"\n    retry: { count: 2, backoff: 1s }\n  - uses: http/wait\n    id: wait\n    with: { url: \"http://127.0.0.1:1/${{ params.tag }}\", timeout: 2s }\n    if: params.mode == 'fast' && steps.build.outputs.x != ''\n    continue_on_error: true\nfinally:\n  - if: ${{ run.status != 'succeeded' }}\n    run: echo cleanup\n    env: { STATUS: \"${{ steps.wait.status }}\" }\n";
}

#[test]
fn deep_nesting_is_refused_quickly() {
    let src = format!("steps: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let out = render(&src);
    assert!(
        out.contains("nesting deeper than") || out.contains("recursion limit"),
        "{out}"
    );
}

#[test]
fn huge_scalar_is_refused() {
    let src = format!("steps:\n  - run: \"{}\"\n", "x".repeat(300 << 10));
    assert!(render(&src).contains("over the limit"));
}

#[test]
fn alias_bomb_is_refused_quickly() {
    // A billion-laughs document: 10^9 nodes if expanded.
    let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let p = i - 1;
        src.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{p}"); 10].join(", ")
        ));
    }
    let out = render(&src);
    assert!(out.contains("alias bomb"), "{out}");
}

#[test]
fn retention_is_loaded() {
    use skiff_core::pipeline::Retention;
    use std::time::Duration;
    let p = load(
        "retention:\n  max_age: 30d\n  max_runs: 200\nsteps:\n  - run: echo\n",
        "case",
    )
    .expect("valid");
    assert_eq!(
        p.retention,
        Retention {
            max_age: Some(Duration::from_secs(30 * 86_400)),
            max_runs: Some(200),
        }
    );
    let p = load(
        "retention: { max_age: 1h }\nsteps:\n  - run: echo\n",
        "case",
    )
    .expect("valid");
    assert_eq!(p.retention.max_age, Some(Duration::from_secs(3600)));
    assert_eq!(p.retention.max_runs, None);
    let p = load(
        "retention: { max_age: 3650d }\nsteps:\n  - run: echo\n",
        "case",
    )
    .expect("valid");
    assert_eq!(p.retention.max_age, Some(Retention::MAX_AGE));
    let p = load("steps:\n  - run: echo\n", "case").expect("valid");
    assert_eq!(p.retention, Retention::default());
}

#[test]
fn working_directory_is_kept_as_written() {
    let p = load(
        "steps:\n  - run: echo\n    working_directory: sub/dir\n  - run: echo\n    working_directory: ./a/b/\n",
        "case",
    )
    .expect("valid");
    assert_eq!(p.steps[0].working_directory.as_deref(), Some("sub/dir"));
    assert_eq!(p.steps[1].working_directory.as_deref(), Some("./a/b/"));
}

/// A file of one 250 KiB anchored scalar and 2,000 aliases to it is 264 KB on disk but 500 MB
/// expanded: refused by the budget of expanded bytes before the copies are made.
#[test]
fn alias_text_bomb_is_refused_quickly() {
    let mut src = format!("big: &big \"{}\"\nlist:\n", "x".repeat(250 << 10));
    for _ in 0..2000 {
        src.push_str("  - *big\n");
    }
    src.push_str("steps:\n  - run: echo\n");
    assert!(src.len() < 300 << 10);
    let out = render(&src);
    insta::assert_snapshot!("alias_text_bomb", out);
}

/// Aliases within the budget expand as before.
#[test]
fn aliases_within_the_budget_expand() {
    let src = format!(
        "env:\n  A: &a \"{}\"\n  B: *a\n  C: *a\nsteps:\n  - run: echo\n",
        "x".repeat(200 << 10)
    );
    let p = load(&src, "case").expect("valid");
    assert_eq!(p.env.len(), 3);
}

/// Duplicate keys are found with a hash set: 40,000 keys, and 20,000 duplicates, each a
/// diagnostic with its source line (the time it takes is measured by `cargo bench --bench
/// foundation -- validate`).
#[test]
fn many_keys_are_checked_in_linear_time() {
    let mut src = String::from("env:\n");
    for i in 0..40_000 {
        src.push_str(&format!("  K{i}: x\n"));
    }
    src.push_str("steps:\n  - run: echo\n");
    let p = load(&src, "case").expect("valid");
    assert_eq!(p.env.len(), 40_000);

    let mut src = String::from("env:\n");
    for i in 0..20_000 {
        src.push_str(&format!("  K{i}: x\n  K{i}: y\n"));
    }
    src.push_str("steps:\n  - run: echo\n");
    let out = render(&src);
    assert_eq!(out.matches("error: duplicate key").count(), 20_000);
    assert!(out.contains("case.yml:40001:3: error: duplicate key `K19999`"));
}

/// Params whose variable names collide are found with a hash map too.
#[test]
fn many_params_are_checked_in_linear_time() {
    let mut src = String::from("params:\n");
    for i in 0..30_000 {
        src.push_str(&format!("  p{i}: x\n"));
    }
    src.push_str("  P0: y\nsteps:\n  - run: echo\n");
    let out = render(&src);
    assert!(
        out.contains("params `p0` and `P0` would share the variable SKIFF_PARAM_P0"),
        "{out}"
    );
}
