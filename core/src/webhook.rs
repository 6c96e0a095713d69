//! Webhook events: a provider's payload normalised to one [`Event`] (`push`, `tag`,
//! `pull_request`, `release`), a pipeline's `on.webhook` filters applied to it, and the params
//! its `on.webhook.params` make of it. The server verifies the signature first; nothing here
//! trusts the payload beyond reading it (values reach steps only as params).
//!
//! Reading is a borrowed parse of the fields skiff needs (a 1 MiB payload is read without
//! building a tree); `event.payload.*` parses the whole body once, only when a pipeline's
//! expressions ask for it.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::expr::{EvalError, Scope, Value};
use crate::pipeline::Webhook;

/// Who sent a delivery, told by its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    Gitea,
    GitLab,
    /// Anything else, signed with `X-Skiff-Signature-256`.
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::Gitea => "gitea",
            Provider::GitLab => "gitlab",
            Provider::Generic => "generic",
        }
    }

    /// `X-Gitlab-Event`, then `X-Gitea-Event`, then `X-GitHub-Event` (Gitea and Forgejo send
    /// GitHub's headers too); the raw event name with it. `header` looks a header up by its
    /// lower-case name.
    pub fn detect<'h>(header: impl Fn(&str) -> Option<&'h str>) -> (Provider, String) {
        if let Some(e) = header("x-gitlab-event") {
            (Provider::GitLab, e.to_string())
        } else if let Some(e) = header("x-gitea-event").or_else(|| header("x-forgejo-event")) {
            (Provider::Gitea, e.to_string())
        } else if let Some(e) = header("x-github-event") {
            (Provider::GitHub, e.to_string())
        } else {
            (
                Provider::Generic,
                header("x-skiff-event").unwrap_or("push").to_string(),
            )
        }
    }
}

/// A delivery's event, normalised across providers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub provider: String,
    /// `push`, `tag`, `pull_request`, `release`, `ping`, or the raw name of another event.
    pub event: String,
    /// The provider's own name (`Push Hook`, `pull_request`...).
    pub raw_event: String,
    pub delivery: String,
    /// The full ref (`refs/heads/main`, `refs/tags/v1`); a pull request's source branch ref.
    pub git_ref: Option<String>,
    /// The branch: pushed to, or a pull request's source branch.
    pub branch: Option<String>,
    /// A pull request's target branch.
    pub base: Option<String>,
    pub tag: Option<String>,
    /// The commit to build.
    pub sha: Option<String>,
    pub before: Option<String>,
    /// `owner/name`.
    pub repo: Option<String>,
    /// A pull request's or release's action (`opened`, `published`...).
    pub action: Option<String>,
    /// A pull request's number.
    pub number: Option<u64>,
    pub sender: Option<String>,
    /// The push deletes its ref.
    pub deleted: bool,
    /// Files added, changed or removed by the listed commits.
    pub paths: Vec<String>,
    /// The commits listed, and how many the push holds when the provider says.
    pub commits_listed: usize,
    pub commits_total: Option<usize>,
}

impl Event {
    /// Whether the payload's commit list may leave commits (and so changed files) out.
    pub fn paths_incomplete(&self) -> Option<String> {
        match self.commits_total {
            Some(total) if total > self.commits_listed => Some(format!(
                "the payload lists {} of {total} commits",
                self.commits_listed
            )),
            // GitHub lists at most 2,048 commits and does not say how many there were.
            None if self.commits_listed >= 2048 => {
                Some("the payload's commit list is cut at 2048".into())
            }
            _ if self.commits_listed == 0 => Some("the payload lists no commits".into()),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the payload is not {what}: {message}")]
pub struct PayloadError {
    what: &'static str,
    message: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Raw<'a> {
    #[serde(rename = "ref", borrow)]
    git_ref: Option<Cow<'a, str>>,
    #[serde(borrow)]
    after: Option<Cow<'a, str>>,
    #[serde(borrow)]
    before: Option<Cow<'a, str>>,
    #[serde(borrow)]
    checkout_sha: Option<Cow<'a, str>>,
    deleted: Option<bool>,
    #[serde(borrow)]
    repository: Option<Repo<'a>>,
    #[serde(borrow)]
    project: Option<Repo<'a>>,
    #[serde(borrow)]
    commits: Option<Vec<Commit<'a>>>,
    total_commits_count: Option<usize>,
    total_commits: Option<usize>,
    #[serde(borrow)]
    pull_request: Option<PullRequest<'a>>,
    number: Option<u64>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    release: Option<Release<'a>>,
    #[serde(borrow)]
    object_attributes: Option<Attributes<'a>>,
    /// GitLab's release hook: the tag.
    #[serde(borrow)]
    tag: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sender: Option<User<'a>>,
    #[serde(borrow)]
    pusher: Option<User<'a>>,
    #[serde(borrow)]
    user_username: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user: Option<User<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Repo<'a> {
    #[serde(borrow)]
    full_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    path_with_namespace: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Commit<'a> {
    #[serde(borrow)]
    added: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    removed: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    modified: Vec<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PullRequest<'a> {
    #[serde(borrow)]
    head: Option<Branch<'a>>,
    #[serde(borrow)]
    base: Option<Branch<'a>>,
    number: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Branch<'a> {
    #[serde(rename = "ref", borrow)]
    git_ref: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sha: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Release<'a> {
    #[serde(borrow)]
    tag_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Attributes<'a> {
    #[serde(borrow)]
    source_branch: Option<Cow<'a, str>>,
    #[serde(borrow)]
    target_branch: Option<Cow<'a, str>>,
    iid: Option<u64>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    last_commit: Option<LastCommit<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LastCommit<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct User<'a> {
    #[serde(borrow)]
    login: Option<Cow<'a, str>>,
    #[serde(borrow)]
    username: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

impl User<'_> {
    fn shown(&self) -> Option<String> {
        self.login
            .as_ref()
            .or(self.username.as_ref())
            .or(self.name.as_ref())
            .map(|s| s.to_string())
    }
}

fn owned(s: &Option<Cow<'_, str>>) -> Option<String> {
    s.as_ref().map(|s| s.to_string())
}

const NO_COMMIT: &str = "0000000000000000000000000000000000000000";

/// Reads a payload (JSON) into an [`Event`].
pub fn parse(
    provider: Provider,
    raw_event: &str,
    delivery: &str,
    json: &[u8],
) -> Result<Event, PayloadError> {
    let raw: Raw<'_> = serde_json::from_slice(json).map_err(|e| PayloadError {
        what: "a JSON object skiff can read",
        message: e.to_string(),
    })?;
    let mut ev = Event {
        provider: provider.as_str().to_string(),
        raw_event: raw_event.to_string(),
        delivery: delivery.to_string(),
        before: owned(&raw.before),
        repo: raw
            .repository
            .as_ref()
            .and_then(|r| r.full_name.as_ref().or(r.path_with_namespace.as_ref()))
            .or_else(|| {
                raw.project
                    .as_ref()
                    .and_then(|p| p.path_with_namespace.as_ref())
            })
            .map(|s| s.to_string()),
        sender: raw
            .sender
            .as_ref()
            .and_then(User::shown)
            .or_else(|| raw.pusher.as_ref().and_then(User::shown))
            .or_else(|| raw.user_username.as_ref().map(|s| s.to_string()))
            .or_else(|| raw.user.as_ref().and_then(User::shown)),
        action: owned(&raw.action),
        ..Event::default()
    };
    let name = match provider {
        Provider::GitLab => match raw_event {
            "Push Hook" => "push",
            "Tag Push Hook" => "tag",
            "Merge Request Hook" => "pull_request",
            "Release Hook" => "release",
            other => other,
        },
        _ => match raw_event {
            "push" => "push",
            "pull_request" => "pull_request",
            "release" => "release",
            "ping" => "ping",
            other => other,
        },
    };
    ev.event = name.to_string();
    match name {
        "push" | "tag" => {
            let git_ref = owned(&raw.git_ref);
            let sha = raw
                .checkout_sha
                .as_ref()
                .or(raw.after.as_ref())
                .map(|s| s.to_string());
            ev.deleted =
                raw.deleted.unwrap_or(false) || sha.as_deref().is_none_or(|s| s == NO_COMMIT);
            if let Some(r) = &git_ref {
                if let Some(tag) = r.strip_prefix("refs/tags/") {
                    ev.event = "tag".into();
                    ev.tag = Some(tag.to_string());
                } else if let Some(branch) = r.strip_prefix("refs/heads/") {
                    ev.branch = Some(branch.to_string());
                }
            }
            ev.git_ref = git_ref;
            ev.sha = sha.filter(|s| s != NO_COMMIT);
            let commits = raw.commits.as_deref().unwrap_or_default();
            ev.commits_listed = commits.len();
            ev.commits_total = raw.total_commits_count.or(raw.total_commits);
            let mut paths: Vec<String> = commits
                .iter()
                .flat_map(|c| c.added.iter().chain(&c.removed).chain(&c.modified))
                .map(|p| p.to_string())
                .collect();
            paths.sort_unstable();
            paths.dedup();
            ev.paths = paths;
        }
        "pull_request" => {
            if let Some(pr) = &raw.pull_request {
                let head = pr.head.as_ref();
                ev.branch = head.and_then(|h| owned(&h.git_ref));
                ev.sha = head.and_then(|h| owned(&h.sha));
                ev.base = pr.base.as_ref().and_then(|b| owned(&b.git_ref));
                ev.number = pr.number.or(raw.number);
            } else if let Some(mr) = &raw.object_attributes {
                ev.branch = owned(&mr.source_branch);
                ev.base = owned(&mr.target_branch);
                ev.sha = mr.last_commit.as_ref().and_then(|c| owned(&c.id));
                ev.number = mr.iid;
                ev.action = owned(&mr.action).or(ev.action);
            }
            ev.git_ref = ev.branch.as_ref().map(|b| format!("refs/heads/{b}"));
        }
        "release" => {
            ev.tag = raw
                .release
                .as_ref()
                .and_then(|r| owned(&r.tag_name))
                .or_else(|| owned(&raw.tag));
            ev.git_ref = ev.tag.as_ref().map(|t| format!("refs/tags/{t}"));
            ev.sha = owned(&raw.checkout_sha);
        }
        _ => {}
    }
    Ok(ev)
}

/// Whether a pipeline's `on.webhook` takes the event; `Err` says why not.
pub fn filter(hook: &Webhook, ev: &Event, scope: &EventScope<'_>) -> Result<(), String> {
    if !hook.events.contains(&ev.event) {
        return Err(format!(
            "event `{}` is not one of its events ({})",
            ev.event,
            hook.events.join(", ")
        ));
    }
    if ev.deleted {
        return Err(format!(
            "the push deletes {}",
            ev.git_ref.as_deref().unwrap_or("its ref")
        ));
    }
    match ev.event.as_str() {
        "push" | "pull_request" if !hook.branches.is_empty() => {
            // A pull request is filtered by the branch it goes into, a push by its own.
            let (branch, what) = match ev.event.as_str() {
                "pull_request" => (ev.base.as_deref(), "target branch"),
                _ => (ev.branch.as_deref(), "branch"),
            };
            let branch = branch.unwrap_or("");
            if !crate::glob::passes(&hook.branches, branch) {
                return Err(format!(
                    "{what} `{branch}` does not match its branches ({})",
                    hook.branches.join(", ")
                ));
            }
        }
        "tag" | "release" if !hook.tags.is_empty() => {
            let tag = ev.tag.as_deref().unwrap_or("");
            if !crate::glob::passes(&hook.tags, tag) {
                return Err(format!(
                    "tag `{tag}` does not match its tags ({})",
                    hook.tags.join(", ")
                ));
            }
        }
        _ => {}
    }
    // Only a push lists the files it changed; when the list may be short, the run goes ahead
    // (a build too many rather than one missed).
    if ev.event == "push" && !hook.paths.is_empty() && ev.paths_incomplete().is_none() {
        let any = ev.paths.iter().any(|p| crate::glob::passes(&hook.paths, p));
        if !any {
            return Err(format!(
                "none of the {} changed files matches its paths ({})",
                ev.paths.len(),
                hook.paths.join(", ")
            ));
        }
    }
    if let Some(cond) = &hook.condition {
        match crate::expr::eval(&cond.expr, scope) {
            Ok(v) if v.truthy() => {}
            Ok(_) => return Err(format!("its if `{}` is false", cond.text)),
            Err(e) => return Err(format!("its if `{}` failed: {e}", cond.text)),
        }
    }
    Ok(())
}

/// The params `on.webhook.params` make of the event; a value that comes out null is left
/// out (the param takes its default).
pub fn params(hook: &Webhook, scope: &EventScope<'_>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (name, template) in &hook.params {
        match template.eval(scope) {
            Ok(Value::Null) => {}
            Ok(v) => {
                out.insert(name.clone(), v.to_string());
            }
            Err(e) => return Err(format!("param `{name}`: {e}")),
        }
    }
    Ok(out)
}

/// What `event.*` reads in `on.webhook.params` and `if`.
pub struct EventScope<'a> {
    pub event: &'a Event,
    /// The payload's JSON text, for `event.payload.*`.
    pub json: &'a [u8],
    payload: OnceCell<serde_json::Value>,
}

impl<'a> EventScope<'a> {
    pub fn new(event: &'a Event, json: &'a [u8]) -> Self {
        EventScope {
            event,
            json,
            payload: OnceCell::new(),
        }
    }
}

fn text(s: &Option<String>) -> Value {
    s.as_ref().map_or(Value::Null, |s| Value::String(s.clone()))
}

impl Scope for EventScope<'_> {
    fn lookup(&self, path: &[String]) -> Result<Value, EvalError> {
        let ev = self.event;
        let field = path.get(1).map(String::as_str).unwrap_or("");
        Ok(match field {
            "ref" => text(&ev.git_ref),
            "branch" => text(&ev.branch),
            "base" => text(&ev.base),
            "tag" => text(&ev.tag),
            "sha" => text(&ev.sha),
            "before" => text(&ev.before),
            "repo" => text(&ev.repo),
            "provider" => Value::String(ev.provider.clone()),
            "event" => Value::String(ev.event.clone()),
            "raw_event" => Value::String(ev.raw_event.clone()),
            "action" => text(&ev.action),
            "number" => ev.number.map_or(Value::Null, |n| Value::Number(n as f64)),
            "sender" => text(&ev.sender),
            "delivery" => Value::String(ev.delivery.clone()),
            "payload" => {
                let root = self.payload.get_or_init(|| {
                    serde_json::from_slice(self.json).unwrap_or(serde_json::Value::Null)
                });
                let mut at = root;
                for key in &path[2..] {
                    at = match at {
                        serde_json::Value::Object(m) => m.get(key.as_str()),
                        serde_json::Value::Array(items) => {
                            key.parse::<usize>().ok().and_then(|i| items.get(i))
                        }
                        _ => None,
                    }
                    .unwrap_or(&serde_json::Value::Null);
                }
                match at {
                    serde_json::Value::Null => Value::Null,
                    serde_json::Value::Bool(b) => Value::Bool(*b),
                    serde_json::Value::Number(n) => n.as_f64().map_or(Value::Null, Value::Number),
                    serde_json::Value::String(s) => Value::String(s.clone()),
                    other => Value::String(other.to_string()),
                }
            }
            _ => Value::Null,
        })
    }

    fn failed(&self) -> bool {
        false
    }

    fn cancelled(&self) -> bool {
        false
    }
}
