//! Webhook payloads as GitHub, Gitea and GitLab send them (their documented examples, trimmed
//! where marked), normalised, filtered and mapped to params.

use skiff_core::pipeline::load;
use skiff_core::webhook::{EventScope, Provider, filter, params, parse};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn hook(on_webhook: &str) -> skiff_core::pipeline::Webhook {
    let src = format!(
        "params:\n  ref: {{}}\n  sha: {{}}\n  repo: {{}}\n  who: {{ default: nobody }}\non:\n  webhook:\n    secret: ${{{{ secrets.HOOK }}}}\n{on_webhook}steps:\n  - run: echo\n"
    );
    load(&src, "build")
        .unwrap_or_else(|d| panic!("{d:?}"))
        .on
        .webhook
        .expect("webhook")
}

const TO_PARAMS: &str = "    params:\n      ref: ${{ event.ref }}\n      sha: ${{ event.sha }}\n      repo: ${{ event.repo }}\n      who: ${{ event.payload.nobody_sends_this }}\n";

#[test]
fn a_push_from_each_provider_maps_to_the_same_params() {
    let cases = [
        (
            Provider::GitHub,
            "push",
            "github-push.json",
            "refs/heads/main",
            "9049f1265b7d61be4a8904a9a27120d2064dab3b",
            "Codertocat/Hello-World",
        ),
        (
            Provider::Gitea,
            "push",
            "gitea-push.json",
            "refs/heads/develop",
            "bffeb74224043ba2feb48d137756c8a9331c449a",
            "gitea/webhooks",
        ),
        (
            Provider::GitLab,
            "Push Hook",
            "gitlab-push.json",
            "refs/heads/master",
            "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "mike/diaspora",
        ),
    ];
    let h = hook(TO_PARAMS);
    for (provider, raw, file, git_ref, sha, repo) in cases {
        let body = fixture(file);
        let ev = parse(provider, raw, "d-1", &body).expect(file);
        assert_eq!(ev.event, "push", "{file}");
        let scope = EventScope::new(&ev, &body);
        filter(&h, &ev, &scope).unwrap_or_else(|why| panic!("{file}: {why}"));
        let p = params(&h, &scope).expect(file);
        assert_eq!(p.get("ref").map(String::as_str), Some(git_ref), "{file}");
        assert_eq!(p.get("sha").map(String::as_str), Some(sha), "{file}");
        assert_eq!(p.get("repo").map(String::as_str), Some(repo), "{file}");
        assert!(
            !p.contains_key("who"),
            "a field the payload lacks is null, so the param keeps its default"
        );
    }
}

#[test]
fn filters_say_why_a_delivery_is_skipped() {
    let body = fixture("github-push.json");
    let ev = parse(Provider::GitHub, "push", "d", &body).expect("parse");
    let scope = EventScope::new(&ev, &body);
    let skipped = |on: &str| filter(&hook(on), &ev, &scope).err();

    assert_eq!(skipped("    branches: [main]\n"), None);
    assert!(
        skipped("    branches: [\"release/**\"]\n")
            .is_some_and(|w| w.contains("branch `main` does not match"))
    );
    assert!(skipped("    events: [tag]\n").is_some_and(|w| w.contains("event `push`")));
    assert_eq!(
        skipped("    paths: [\"*.md\"]\n"),
        None,
        "README.md changed"
    );
    assert!(
        skipped("    paths: [\"src/**\"]\n").is_some_and(|w| w.contains("none of the 1 changed"))
    );
    assert_eq!(
        skipped(
            "    if: event.payload.repository.private == false && event.sender == 'Codertocat'\n"
        ),
        None
    );
    assert!(
        skipped("    if: event.payload.repository.private\n")
            .is_some_and(|w| w.contains("is false"))
    );

    // GitLab lists 2 of the push's 4 commits: the paths of the others are unknown, so a paths
    // filter lets it through rather than miss a build.
    let gl = fixture("gitlab-push.json");
    let ev = parse(Provider::GitLab, "Push Hook", "d", &gl).expect("parse");
    assert_eq!(
        ev.paths_incomplete().as_deref(),
        Some("the payload lists 2 of 4 commits")
    );
    let scope = EventScope::new(&ev, &gl);
    assert_eq!(
        filter(&hook("    paths: [\"docs/**\"]\n"), &ev, &scope),
        Ok(())
    );
}

#[test]
fn a_deleted_tag_and_other_events() {
    let body = fixture("github-tag-deleted.json");
    let ev = parse(Provider::GitHub, "push", "d", &body).expect("parse");
    assert_eq!(
        (ev.event.as_str(), ev.tag.as_deref()),
        ("tag", Some("simple-tag"))
    );
    assert!(ev.deleted && ev.sha.is_none());
    let scope = EventScope::new(&ev, &body);
    assert!(
        filter(&hook("    events: [tag]\n"), &ev, &scope)
            .is_err_and(|w| w.contains("deletes refs/tags/simple-tag"))
    );

    let pr = br#"{"action":"opened","number":7,"pull_request":{"number":7,"head":{"ref":"feature/x","sha":"abc"},"base":{"ref":"main"}},"repository":{"full_name":"o/r"}}"#;
    let ev = parse(Provider::GitHub, "pull_request", "d", pr).expect("parse");
    assert_eq!(
        (
            ev.branch.as_deref(),
            ev.base.as_deref(),
            ev.sha.as_deref(),
            ev.number
        ),
        (Some("feature/x"), Some("main"), Some("abc"), Some(7))
    );
    let scope = EventScope::new(&ev, pr);
    assert_eq!(
        filter(
            &hook("    events: [pull_request]\n    branches: [main]\n"),
            &ev,
            &scope
        ),
        Ok(()),
        "a pull request is filtered by the branch it goes into"
    );

    let mr = br#"{"object_kind":"merge_request","object_attributes":{"iid":3,"source_branch":"fix","target_branch":"main","action":"open","last_commit":{"id":"def"}}}"#;
    let ev = parse(Provider::GitLab, "Merge Request Hook", "d", mr).expect("parse");
    assert_eq!(
        (
            ev.event.as_str(),
            ev.branch.as_deref(),
            ev.sha.as_deref(),
            ev.number
        ),
        ("pull_request", Some("fix"), Some("def"), Some(3))
    );

    let rel = br#"{"action":"published","release":{"tag_name":"v1.2.0"}}"#;
    let ev = parse(Provider::GitHub, "release", "d", rel).expect("parse");
    let scope = EventScope::new(&ev, rel);
    assert_eq!(
        filter(
            &hook("    events: [release]\n    tags: [\"v1.*\"]\n"),
            &ev,
            &scope
        ),
        Ok(())
    );
    assert!(
        filter(
            &hook("    events: [release]\n    tags: [\"v2.*\"]\n"),
            &ev,
            &scope
        )
        .is_err()
    );

    assert!(parse(Provider::GitHub, "push", "d", b"[1, 2").is_err());
    assert!(parse(Provider::GitHub, "push", "d", b"\"a string\"").is_err());
}

#[test]
fn a_branch_name_stays_text() {
    let body = br#"{"ref":"refs/heads/$(touch /tmp/pwned)","after":"1111111111111111111111111111111111111111","commits":[]}"#;
    let ev = parse(Provider::GitHub, "push", "d", body).expect("parse");
    let scope = EventScope::new(&ev, body);
    let p = params(&hook(TO_PARAMS), &scope).expect("params");
    assert_eq!(p["ref"], "refs/heads/$(touch /tmp/pwned)");
}
