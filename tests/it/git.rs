//! `git/checkout` against real repositories on loopback: served by `git daemon` (driven by a
//! signed push webhook, the way a build starts) and by Debian's `openssh-server` with a deploy
//! key, a pinned host key, a wrong host key and no key; what a step can see afterwards.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::docker::free_port;
use crate::harness::{DEADLINE, Server, call, scratch};
use crate::hooks::sign;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git is installed (Debian's git)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository `app.git` under `root` with two commits on `main`; their shas.
fn repository(root: &Path) -> (String, String) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("hello.txt"), "version one\n").expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("hello.txt"), "version two\n").expect("write");
    git(&work, &["commit", "-q", "-am", "two"]);
    let second = git(&work, &["rev-parse", "HEAD"]);
    let bare = root.join("srv").join("app.git");
    std::fs::create_dir_all(bare.parent().expect("parent")).expect("mkdir");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().expect("path"),
            bare.to_str().expect("path"),
        ],
    );
    (first, second)
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let until = Instant::now() + DEADLINE;
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port}");
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BUILD: &str = r#"params:
  repo: {}
  ref: { default: main }
  sha: {}
on:
  webhook:
    hook: app
    secret: ${{ secrets.HOOK }}
    params:
      ref: ${{ event.ref }}
      sha: ${{ event.sha }}
steps:
  - id: co
    uses: git/checkout
    with:
      repository: ${{ params.repo }}
      ref: ${{ params.ref }}
      sha: ${{ params.sha }}
      path: src
  - env: { SHA: "${{ steps.co.outputs.sha }}" }
    run: |
      cat src/hello.txt
      echo "checked out $SHA"
      echo "commits: $(git -C src rev-list --count HEAD 2>/dev/null || echo unreadable)"
      [ "$(stat -c %u src/hello.txt)" = "$(id -u)" ] && echo "files are mine"
      ls -a src
"#;

#[test]
fn a_signed_push_checks_out_its_commit_from_git_daemon() {
    let root = scratch();
    let (first, second) = repository(root.path());
    let port = free_port();
    let srv = root.path().join("srv");
    let mut daemon = Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={}", srv.display()),
            srv.to_str().expect("path"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon (Debian's git)");
    wait_for_port(port, &mut daemon, "git daemon");
    let _daemon = Killed(daemon);
    let repo = format!("git://127.0.0.1:{port}/app.git");
    let pipeline = BUILD.replace("repo: {}", &format!("repo: {{ default: \"{repo}\" }}"));
    let s = Server::start_with(
        &[("build", &pipeline)],
        &[("SKIFF_SECRET_HOOK", "hook-secret")],
    );

    // The branch tip, by hand.
    let (run, log) = s.run_and_wait("build", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(log.contains("version two"), "{log}");
    assert!(log.contains(&format!("checked out {second}")), "{log}");
    assert!(log.contains("commits: 1"), "shallow by default: {log}");
    assert!(log.contains("files are mine"), "{log}");

    // A push naming the first commit (a delivery can be late): that commit is built.
    let body = json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000000",
        "after": first,
        "repository": { "full_name": "me/app" },
        "commits": [],
        "head_commit": { "id": first },
    })
    .to_string();
    let sig = format!("sha256={}", sign("hook-secret", &body));
    let (status, answer) = call(
        "POST",
        &format!("{}/hooks/app", s.base),
        Some(&body),
        &[
            ("x-github-event", "push"),
            ("x-github-delivery", "d-1"),
            ("x-hub-signature-256", &sig),
        ],
    );
    assert_eq!(status, 202, "{answer}");
    let id = answer["results"][0]["run"]
        .as_str()
        .expect("a run")
        .to_string();
    let run = s.wait_for_end(&id);
    let log = s.log_text(&id);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert_eq!(run["params"]["sha"], first.as_str(), "{run}");
    assert!(log.contains("version one"), "{log}");
    assert!(log.contains(&format!("checked out {first}")), "{log}");

    // Refused before git runs: a repository URL that is an option, a local path, a password.
    for (repo, why) in [
        ("--upload-pack=touch /tmp/pwned", "not a repository URL"),
        ("/etc", "not a repository URL"),
        ("file:///etc", "is not fetched"),
        ("https://me:hunter2@example.com/app.git", "holds a password"),
    ] {
        let (run, log) = s.run_and_wait("build", json!({ "repo": repo }));
        assert_eq!(run["status"], "failed", "{repo}: {run}\n{log}");
        // In the log, where people read, not only in the step's record.
        assert!(log.contains(why), "{repo}: {log}");
        assert!(log.contains("`git/checkout` failed"), "{repo}: {log}");
    }
    assert!(!Path::new("/tmp/pwned").exists());
    // A commit that is not there.
    let (run, log) = s.run_and_wait(
        "build",
        json!({ "sha": "1111111111111111111111111111111111111111" }),
    );
    assert_eq!(run["status"], "failed", "{run}\n{log}");
}

const DEPLOY_KEY: &str = r#"params:
  repo: {}
  known_hosts: { default: "" }
steps:
  - id: co
    uses: git/checkout
    with:
      repository: ${{ params.repo }}
      ssh_key: ${{ secrets.DEPLOY_KEY }}
      known_hosts: ${{ params.known_hosts }}
  - run: |
      cat hello.txt
      if grep -rl "PRIVATE KEY" "$HOME" "$TMPDIR" . 2>/dev/null; then echo "KEY FOUND"; else echo "no key here"; fi
      env | grep -c DEPLOY || true
"#;

#[test]
fn a_deploy_key_fetches_over_ssh_and_a_wrong_host_key_is_refused() {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "/usr/sbin/sshd is missing: install Debian's openssh-server (.ci/run does)"
    );
    let root = scratch();
    let (_, second) = repository(root.path());
    let keys = root.path().join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    let keygen = |name: &str| {
        let path = keys.join(name);
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen")
            .success();
        assert!(ok);
        path
    };
    let host = keygen("host");
    let client = keygen("client");
    let other_host = keygen("other");
    let authorized = keys.join("authorized_keys");
    std::fs::copy(client.with_extension("pub"), &authorized).expect("authorized_keys");
    let port = free_port();
    let config = keys.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n",
            host.display(),
            authorized.display(),
            keys.join("sshd.pid").display()
        ),
    )
    .expect("config");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let mut daemon = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd");
    wait_for_port(port, &mut daemon, "sshd");
    let _daemon = Killed(daemon);

    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let repo = format!(
        "ssh://{user}@127.0.0.1:{port}{}",
        root.path().join("srv/app.git").display()
    );
    let host_line = |key: &Path| {
        let public = std::fs::read_to_string(key.with_extension("pub")).expect("pub");
        let mut parts = public.split_whitespace();
        format!(
            "[127.0.0.1]:{port} {} {}",
            parts.next().expect("type"),
            parts.next().expect("key")
        )
    };
    let private_key = std::fs::read_to_string(&client).expect("key");
    let s = Server::start_with(
        &[
            ("deploy", DEPLOY_KEY),
            (
                "nokey",
                &DEPLOY_KEY.replace("      ssh_key: ${{ secrets.DEPLOY_KEY }}\n", ""),
            ),
        ],
        &[("SKIFF_SECRET_DEPLOY_KEY", private_key.as_str())],
    );

    let (run, log) = s.run_and_wait(
        "deploy",
        json!({ "repo": repo, "known_hosts": host_line(&host) }),
    );
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(log.contains("version two"), "{log}");
    assert!(
        log.contains("no key here"),
        "the key never reaches a step: {log}"
    );
    assert!(!log.contains("KEY FOUND"), "{log}");
    assert_eq!(outputs(&run)["sha"], second.as_str(), "{run}");

    // Not pinned: the key shown is taken, and the log says so.
    let (run, log) = s.run_and_wait("deploy", json!({ "repo": repo }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(log.contains("no `known_hosts` given"), "{log}");

    // A server showing another host key (a man in the middle): refused.
    let (run, log) = s.run_and_wait(
        "deploy",
        json!({ "repo": repo, "known_hosts": host_line(&other_host) }),
    );
    assert_eq!(run["status"], "failed", "{run}\n{log}");
    assert!(log.contains("Host key verification failed"), "{log}");
    // No key at all: the server turns it away.
    let (run, log) = s.run_and_wait(
        "nokey",
        json!({ "repo": repo, "known_hosts": host_line(&host) }),
    );
    assert_eq!(run["status"], "failed", "{run}\n{log}");
    assert!(run.to_string().contains("Permission denied"), "{run}");
}

fn outputs(run: &Value) -> Value {
    run["steps"]
        .as_array()
        .and_then(|s| s.first())
        .map(|s| s["outputs"].clone())
        .unwrap_or(Value::Null)
}
