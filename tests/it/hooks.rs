//! Webhooks over real HTTP against the real binary: signatures (GitHub's documented example),
//! attacks (a tampered body, a wrong secret, no signature, an unknown hook, an oversized body, a
//! replayed delivery, a branch name written to run code), each provider's push, the
//! deliveries log and Redeliver, and the hooks-only listener.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::harness::{Server, call, eventually, raw};

const SECRET: &str = "It's a Secret to Everybody";

pub fn sign(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fixture(name: &str) -> String {
    let path = format!("{}/core/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A GitHub delivery to `url`; `signature: None` sends none.
fn github(url: &str, event: &str, id: &str, body: &str, signature: Option<&str>) -> (u16, Value) {
    let sig = signature.map(|s| format!("sha256={s}"));
    let mut headers = vec![("x-github-event", event), ("x-github-delivery", id)];
    if let Some(s) = &sig {
        headers.push(("x-hub-signature-256", s.as_str()));
    }
    call("POST", url, Some(body), &headers)
}

const BUILD: &str = r#"params:
  ref: {}
  sha: {}
on:
  manual: false
  webhook:
    hook: repo
    secret: ${{ secrets.HOOK }}
    events: [push]
    params:
      ref: ${{ event.ref }}
      sha: ${{ event.sha }}
steps:
  - run: 'printf "ref=%s sha=%s\n" "$SKIFF_PARAM_REF" "$SKIFF_PARAM_SHA"'
"#;

fn runs(s: &Server) -> Vec<Value> {
    let (status, page) = s.api("GET", "/api/runs?pipeline=build", None);
    assert_eq!(status, 200, "{page}");
    page["runs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn signed_deliveries_start_runs_and_nothing_else_does() {
    let s = Server::start_with(
        &[("build", BUILD)],
        &[
            ("SKIFF_SECRET_HOOK", SECRET),
            ("SKIFF_HOOKS_LISTEN", "127.0.0.1:0"),
        ],
    );
    let hooks = s.hooks_base.clone().expect("the hooks listener's address");
    let url = format!("{hooks}/hooks/repo");

    // GitHub's documented example: a ping signed with its secret answers 200, starts nothing.
    let documented = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    assert_eq!(sign(SECRET, "Hello, World!"), documented);
    let (status, body) = github(&url, "ping", "p-1", "Hello, World!", Some(documented));
    assert_eq!(status, 200, "{body}");

    // Attacks: each is a 401 with the same body, and starts nothing.
    let push = fixture("github-push.json");
    let good = sign(SECRET, &push);
    let tampered = push.replace("refs/heads/main", "refs/heads/evil");
    let refusals = [
        github(&url, "push", "a-1", &tampered, Some(&good)),
        github(
            &url,
            "push",
            "a-2",
            &push,
            Some(&sign("not the secret", &push)),
        ),
        github(&url, "push", "a-3", &push, None),
        github(&url, "push", "a-4", &push, Some("zz")),
        github(
            &format!("{hooks}/hooks/nope"),
            "push",
            "a-5",
            &push,
            Some(&good),
        ),
        github(&s.url("/hooks/build"), "push", "a-6", &push, Some(&good)),
    ];
    for (i, (status, body)) in refusals.iter().enumerate() {
        assert_eq!(*status, 401, "attack {i}: {body}");
        assert_eq!(
            body, &refusals[0].1,
            "attack {i}: an unknown hook looks like a bad signature"
        );
    }
    // Over the limit (1 MiB) by megabytes: read and thrown away, so the client, done sending,
    // gets its 413 (not a connection closed under it).
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(3 << 20));
    let (status, body) = github(&url, "push", "a-7", &big, Some(&sign(SECRET, &big)));
    assert_eq!(status, 413, "{body}");
    assert!(runs(&s).is_empty(), "no attack started a run");

    // A signed push starts one run with the params the event gave.
    let (status, body) = github(&url, "push", "d-1", &push, Some(&good));
    assert_eq!(status, 202, "{body}");
    let run_id = body["results"][0]["run"]
        .as_str()
        .expect("a run")
        .to_string();
    let run = s.wait_for_end(&run_id);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["trigger"]["kind"], "webhook", "{run}");
    assert_eq!(run["params"]["ref"], "refs/heads/main");
    assert!(
        s.log_text(&run_id)
            .contains("ref=refs/heads/main sha=9049f1265b7d61be4a8904a9a27120d2064dab3b")
    );

    // The same delivery again (GitHub's Redeliver reuses the id): 200, naming the same run.
    let (status, again) = github(&url, "push", "d-1", &push, Some(&good));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["results"][0]["run"], run_id.as_str());
    assert_eq!(runs(&s).len(), 1, "a replay starts nothing");

    // Bodies past the API's own limit (256 KiB) are fine here, and the main listener takes
    // hooks too.
    let padded = push.replacen('{', &format!("{{\"pad\":\"{}\",", "y".repeat(300 << 10)), 1);
    let (status, body) = github(
        &s.url("/hooks/repo"),
        "push",
        "d-2",
        &padded,
        Some(&sign(SECRET, &padded)),
    );
    assert_eq!(status, 202, "{body}");

    // The hooks listener serves hooks only.
    for path in ["/api/runs", "/", "/login", "/api/deliveries"] {
        let (status, _, _) = raw("GET", &format!("{hooks}{path}"), None, &[]);
        assert_eq!(status, 404, "{path} on the hooks listener");
    }

    // The log: every arrival, verified or not, with why; secrets masked; a refused body cut.
    let (status, log) = s.api("GET", "/api/deliveries?hook=repo", None);
    assert_eq!(status, 200, "{log}");
    let entries = log["deliveries"].as_array().expect("list");
    let outcomes: Vec<&str> = entries
        .iter()
        .filter_map(|d| d["outcome"].as_str())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "refused").count(),
        4,
        "{outcomes:?}"
    );
    let (_, unknown) = s.api("GET", "/api/deliveries?hook=nope", None);
    assert_eq!(
        unknown["deliveries"][0]["reason"],
        "no pipeline names this hook"
    );
    let replay = &entries[1];
    assert_eq!(replay["id"], "d-1");
    assert!(
        replay["results"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("delivered before")),
        "{replay}"
    );
    let tamper = entries
        .iter()
        .find(|d| d["id"] == "a-1")
        .expect("the tampered delivery is logged");
    assert_eq!(tamper["verified"], false);
    assert!(
        tamper["reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not match"))
    );
    let (status, one) = s.api(
        "GET",
        &format!("/api/deliveries/{}", tamper["key"].as_str().unwrap_or("")),
        None,
    );
    assert_eq!(status, 200, "{one}");
    assert!(
        one["body"]
            .as_str()
            .is_some_and(|b| b.contains("refs/heads/evil"))
    );
    assert!(one["headers"].as_array().is_some_and(|h| !h.is_empty()));
    // Without a token the log is closed.
    let (status, _) = call("GET", &s.url("/api/deliveries"), None, &[]);
    assert_eq!(status, 401);
}

#[test]
fn a_branch_name_never_becomes_code() {
    let s = Server::start_with(&[("build", BUILD)], &[("SKIFF_SECRET_HOOK", SECRET)]);
    let marker = s.data_dir().with_file_name("pwned");
    let evil = format!("refs/heads/$(touch {})", marker.display());
    let body = json!({
        "ref": evil,
        "after": "1111111111111111111111111111111111111111",
        "commits": [],
        "repository": { "full_name": "o/r" }
    })
    .to_string();
    let (status, answer) = github(
        &s.url("/hooks/repo"),
        "push",
        "inj",
        &body,
        Some(&sign(SECRET, &body)),
    );
    assert_eq!(status, 202, "{answer}");
    let id = answer["results"][0]["run"]
        .as_str()
        .expect("run")
        .to_string();
    let run = s.wait_for_end(&id);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(
        s.log_text(&id).contains(&format!("ref={evil}")),
        "the text arrives as it was"
    );
    assert!(!marker.exists(), "the branch name ran as code");
}

#[test]
fn gitlab_and_gitea_pushes_and_redeliver() {
    let deploy = BUILD.replace("hook: repo", "hook: repo\n    branches: [master, develop]");
    let s = Server::start_with(&[("build", &deploy)], &[("SKIFF_SECRET_HOOK", SECRET)]);
    let url = s.url("/hooks/repo");

    // GitLab sends the secret itself, as a token.
    let gl = fixture("gitlab-push.json");
    let gitlab = |token: &str, id: &str| {
        call(
            "POST",
            &url,
            Some(&gl),
            &[
                ("x-gitlab-event", "Push Hook"),
                ("x-gitlab-token", token),
                ("x-gitlab-event-uuid", id),
            ],
        )
    };
    assert_eq!(gitlab("wrong", "gl-0").0, 401);
    let (status, body) = gitlab(SECRET, "gl-1");
    assert_eq!(status, 202, "{body}");
    let run = s.wait_for_end(body["results"][0]["run"].as_str().expect("run"));
    assert_eq!(
        run["params"]["sha"],
        "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    );

    // Gitea, form-encoded: it signs the JSON payload, not the form.
    let gt = fixture("gitea-push.json");
    let form: String = format!(
        "payload={}",
        gt.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' =>
                    (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let (status, body) = call(
        "POST",
        &url,
        Some(&form),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-gitea-event", "push"),
            ("x-gitea-delivery", "gt-1"),
            ("x-gitea-signature", &sign(SECRET, &gt)),
        ],
    );
    assert_eq!(status, 202, "{body}");
    let run = s.wait_for_end(body["results"][0]["run"].as_str().expect("run"));
    assert_eq!(run["params"]["ref"], "refs/heads/develop");

    // A push to a branch the filter leaves out is logged as skipped, with why, and kept whole;
    // skiff's Redeliver sends it again (the same outcome: it is evaluated again).
    let other = gl.replace("refs/heads/master", "refs/heads/wip");
    let (status, body) = call(
        "POST",
        &url,
        Some(&other),
        &[
            ("x-gitlab-event", "Push Hook"),
            ("x-gitlab-token", SECRET),
            ("x-gitlab-event-uuid", "gl-2"),
        ],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "skipped");
    assert!(
        body["results"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("branch `wip`"))
    );
    let (_, log) = s.api("GET", "/api/deliveries", None);
    let logged = &log["deliveries"][0];
    assert_eq!(logged["id"], "gl-2");
    assert_eq!(logged["body_whole"], true);
    let (_, one) = s.api(
        "GET",
        &format!("/api/deliveries/{}", logged["key"].as_str().unwrap_or("")),
        None,
    );
    assert!(
        one["headers"].as_array().is_some_and(|h| h
            .iter()
            .any(|kv| kv[0] == "x-gitlab-token" && kv[1] == "***")),
        "the token is masked: {one}"
    );
    assert!(!one.to_string().contains(SECRET));

    // Redeliver the started GitLab push: a new run each time, recorded with who asked.
    let started = log["deliveries"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["id"] == "gl-1"))
        .expect("gl-1")
        .clone();
    let key = started["key"].as_str().expect("key");
    let before = runs(&s).len();
    let (status, first) = s.api("POST", &format!("/api/deliveries/{key}/redeliver"), None);
    assert_eq!(status, 202, "{first}");
    let (status, second) = s.api("POST", &format!("/api/deliveries/{key}/redeliver"), None);
    assert_eq!(status, 202, "{second}");
    assert_ne!(first["results"][0]["run"], second["results"][0]["run"]);
    eventually("two more runs", || runs(&s).len() == before + 2);
    let (_, log) = s.api("GET", "/api/deliveries?limit=1", None);
    assert_eq!(log["deliveries"][0]["redelivery"]["count"], 2, "{log}");
    assert_eq!(log["deliveries"][0]["redelivery"]["of"], key);
}

/// The Deliveries pages: the log as a list, one delivery with its headers and (escaped) body,
/// and Redeliver through the form (CSRF-checked), landing on the new entry.
#[test]
fn the_deliveries_pages_show_the_log_and_redeliver() {
    use crate::api::{csrf_of, sign_in};
    let s = Server::start_with(&[("build", BUILD)], &[("SKIFF_SECRET_HOOK", SECRET)]);
    let url = format!("{}/hooks/repo", s.base);
    let body =
        fixture("github-push.json").replacen('{', "{\"note\":\"<script>alert(1)</script>\",", 1);
    let (status, answer) = github(&url, "push", "ui-1", &body, Some(&sign(SECRET, &body)));
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = github(&url, "push", "ui-2", &body, Some("00"));
    assert_eq!(status, 401, "{answer}");
    let cookie = sign_in(&s);
    let page = |path: &str| {
        let (status, _, html) = raw("GET", &s.url(path), None, &[("cookie", &cookie)]);
        assert_eq!(status, 200, "{path}: {html}");
        html
    };
    let list = page("/deliveries");
    assert!(list.contains("ui-1") && list.contains("ui-2"), "{list}");
    assert!(
        list.contains("not verified"),
        "the refused one says so: {list}"
    );
    assert!(list.contains("href=\"/deliveries\""), "in the menu");
    let (_, log) = s.api("GET", "/api/deliveries?hook=repo", None);
    let key = log["deliveries"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["id"] == "ui-1"))
        .and_then(|d| d["key"].as_str())
        .expect("ui-1")
        .to_string();
    let one = page(&format!("/deliveries/{key}"));
    assert!(one.contains("x-github-delivery"), "{one}");
    assert!(
        one.contains("&#60;script&#62;alert(1)&#60;"),
        "the body is escaped"
    );
    assert!(!one.contains("<script>alert(1)"), "{one}");
    assert!(one.contains("its run"), "a link to the run it made: {one}");
    let runs_before = runs(&s).len();
    let csrf = csrf_of(&one);
    let (status, headers, _) = raw(
        "POST",
        &s.url(&format!("/deliveries/{key}/redeliver")),
        Some("csrf=wrong"),
        &[
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(status, 403, "a wrong CSRF token: {headers:?}");
    let (status, headers, _) = raw(
        "POST",
        &s.url(&format!("/deliveries/{key}/redeliver")),
        Some(&format!("csrf={csrf}")),
        &[
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(status, 303, "{headers:?}");
    let to = headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .expect("a redirect");
    assert!(
        to.starts_with("/deliveries/") && !to.ends_with(&key),
        "{to}"
    );
    let again = page(&to);
    assert!(again.contains("redelivery #1 by"), "{again}");
    eventually("the redelivery's run", || runs(&s).len() == runs_before + 1);
}
