//! `docker/build` and `docker/push` against the real Docker engine on this machine and a real
//! Docker Distribution registry (Debian's `docker-registry`) with htpasswd auth, on a free
//! loopback port. Images are built FROM scratch around Debian's static busybox (nothing can be
//! pulled here).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::harness::Server;

fn need(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is missing: install Debian's {package} (`apt-get install {package}`)"
    );
}

fn docker(args: &[&str]) -> (bool, String) {
    need("docker", "docker.io");
    let out = Command::new("docker").args(args).output().expect("docker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A registry of its own on a free loopback port, with one user.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(user: &str, password: &str) -> Registry {
        Registry::start_with(Some((user, password)))
    }

    /// A registry with one user, or open to all (as the README's local one).
    pub fn start_with(user: Option<(&str, &str)>) -> Registry {
        need("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut auth = String::new();
        if let Some((user, password)) = user {
            need("htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("htpasswd file");
            auth = format!(
                "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: {addr}\n{auth}",
            root = dir.path().join("data").display(),
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = Registry {
            child,
            addr,
            _dir: dir,
        };
        crate::harness::eventually("the registry answers", || {
            std::net::TcpStream::connect(&registry.addr).is_ok()
        });
        registry
    }

    /// GET on the registry's API, with basic auth when given.
    pub fn get(&self, path: &str, auth: Option<(&str, &str)>) -> (u16, Value) {
        let mut headers = Vec::new();
        let basic;
        if let Some((u, p)) = auth {
            use base64::Engine as _;
            basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            );
            headers.push(("Authorization", basic.as_str()));
        }
        crate::harness::call(
            "GET",
            &format!("http://{}{path}", self.addr),
            None,
            &headers,
        )
    }
}

const USER: &str = "skiff";
/// Its standard base64 holds `+` and `/`, which the engine does not read (it reads base64url).
const PASSWORD: &str = "s3cret>?~>?~pw";

/// The files of a tiny HTTP service image (busybox httpd), written by a step into `app/`.
pub fn context_step(dockerfile: &str) -> String {
    format!(
        r#"  - name: Write the context
    run: |
      mkdir -p app/www
      cp /bin/busybox app/busybox
      echo "hello from skiff" > app/www/index.html
      printf '%s\n' {lines} > app/Dockerfile
      printf 'www/*.tmp\n' > app/.dockerignore
      echo junk > app/www/x.tmp
"#,
        lines = dockerfile
            .lines()
            .map(|l| format!("'{l}'"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

pub const DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]";

fn server_with_registry(pipelines: &[(&str, &str)], registry: &Registry, dir: &Path) -> Server {
    let config = dir.join("skiff.toml");
    std::fs::write(
        &config,
        format!(
            "[[registry]]\nname = \"home\"\nkind = \"registry\"\nurl = \"{}\"\nusername = \"{USER}\"\npassword = \"${{{{ secrets.REGISTRY_PASSWORD }}}}\"\n",
            registry.addr
        ),
    )
    .expect("skiff.toml");
    Server::start_with(
        pipelines,
        &[
            ("SKIFF_CONFIG", config.to_str().expect("path")),
            ("SKIFF_SECRET_REGISTRY_PASSWORD", PASSWORD),
        ],
    )
}

/// An image name no other test (or test run) uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("skiff-it-{name}-{}-{nanos}", std::process::id())
}

fn step_outputs(s: &Server, id: &str) -> Vec<Value> {
    let (_, run) = s.api("GET", &format!("/api/runs/{id}"), None);
    run["steps"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_pipeline_builds_an_image_and_pushes_it_to_a_private_registry() {
    let registry = Registry::start(USER, PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = unique("app");
    let yaml = format!(
        "steps:\n{ctx}  - id: build\n    uses: docker/build\n    with:\n      context: app\n      tags: [\"{tag}:v1\"]\n      labels: {{ team: home }}\n  - id: push\n    uses: docker/push\n    with:\n      image: ${{{{ steps.build.outputs.image }}}}\n      registry: home\n  - run: echo \"pushed $SKIFF_STEP_PUSH_IMAGE at $SKIFF_STEP_PUSH_DIGEST\"\n",
        ctx = context_step(DOCKERFILE)
    );
    let s = server_with_registry(&[("ship", &yaml)], &registry, dir.path());
    let (run, log) = s.run_and_wait("ship", json!({}));
    let _cleanup = Cleanup(vec![
        format!("{tag}:v1"),
        format!("{}/{tag}:v1", registry.addr),
    ]);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(
        log.contains(" : FROM scratch"),
        "the build's output is in the log: {log}"
    );
    assert!(!log.contains(PASSWORD), "{log}");
    let id = run["id"].as_str().expect("id");
    let steps = step_outputs(&s, id);
    let build = &steps[1]["outputs"];
    let image_id = build["image_id"].as_str().expect("image_id");
    assert!(image_id.starts_with("sha256:"), "{build}");
    assert_eq!(build["image"], format!("{tag}:v1"));
    let push = &steps[2]["outputs"];
    assert_eq!(push["image"], format!("{}/{tag}:v1", registry.addr));
    let digest = push["digest"].as_str().expect("digest");
    assert!(digest.starts_with("sha256:"), "{push}");
    assert!(log.contains(&format!("at {digest}")), "{log}");
    // The registry has it, under the user's name.
    let (status, tags) = registry.get(&format!("/v2/{tag}/tags/list"), Some((USER, PASSWORD)));
    assert_eq!(status, 200, "{tags}");
    assert_eq!(tags["tags"], json!(["v1"]));
    // Labelled at the source with its run; the ignored file stayed out of the context.
    let (ok, labels) = docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Labels}}",
        image_id,
    ]);
    assert!(ok, "{labels}");
    let labels: Value = serde_json::from_str(labels.trim()).expect("labels");
    assert_eq!(labels["skiff.run"], id);
    assert_eq!(labels["skiff.pipeline"], "ship");
    assert_eq!(labels["team"], "home");
    let (_, files) = docker(&["run", "--rm", image_id, "/bin/busybox", "ls", "/www"]);
    assert_eq!(files.trim(), "index.html", "`.dockerignore` is honoured");
}

#[test]
fn build_and_push_failures_fail_the_step_with_a_clear_reason() {
    let registry = Registry::start(USER, "another-password");
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = unique("bad");
    let broken = format!(
        "steps:\n{ctx}  - uses: docker/build\n    with: {{ context: app, tags: [\"{tag}:broken\"] }}\n",
        ctx = context_step("FROM scratch\nCOPY no-such-file /x")
    );
    let wrong_password = format!(
        "steps:\n{ctx}  - id: build\n    uses: docker/build\n    with: {{ context: app, tags: [\"{tag}:ok\"] }}\n  - uses: docker/push\n    with: {{ image: \"{tag}:ok\", registry: home }}\n",
        ctx = context_step(DOCKERFILE)
    );
    let undeclared = format!(
        "steps:\n  - uses: docker/push\n    with: {{ image: \"{tag}:ok\", registry: elsewhere }}\n"
    );
    let s = server_with_registry(
        &[
            ("broken", &broken),
            ("wrong-password", &wrong_password),
            ("undeclared", &undeclared),
        ],
        &registry,
        dir.path(),
    );
    let _cleanup = Cleanup(vec![
        format!("{tag}:ok"),
        format!("{}/{tag}:ok", registry.addr),
    ]);

    let (run, log) = s.run_and_wait("broken", json!({}));
    assert_eq!(run["status"], "failed", "{run}\n{log}");
    let reason = run["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the build failed") && reason.contains("no-such-file"),
        "the engine's own message: {run}\n{log}"
    );

    let (run, log) = s.run_and_wait("wrong-password", json!({}));
    assert_eq!(run["status"], "failed", "{run}\n{log}");
    let reason = run["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("to registry {}", registry.addr))
            && reason.contains("username and password"),
        "a wrong password names the registry: {run}\n{log}"
    );
    assert!(!log.contains(PASSWORD) && !reason.contains(PASSWORD));

    // An undeclared registry is found when the pipeline loads: no run starts.
    let (status, pipeline) = s.api("GET", "/api/pipelines/undeclared", None);
    assert_eq!(status, 200, "{pipeline}");
    assert!(
        pipeline
            .to_string()
            .contains("registry `elsewhere` is not declared in skiff's config (declared: home)"),
        "{pipeline}"
    );
    let (status, body) = s.api("POST", "/api/pipelines/undeclared/runs", Some("{}"));
    assert_eq!(status, 409, "{body}");
}

/// A step plants links to skiff's database in the build context, and names a link as the
/// context itself: the first is sent as a link (the image holds no database), the second is
/// refused.
#[test]
fn a_link_in_a_build_context_leaks_nothing() {
    let registry = Registry::start(USER, PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = unique("links");
    let s = server_with_registry(&[], &registry, dir.path());
    let db = s.data_dir().join("skiff.db");
    let yaml = format!(
        "steps:\n{ctx}  - run: |\n      ln -s {db} app/db\n      ln -s {data} data-link\n  - uses: docker/build\n    with: {{ context: app, tags: [\"{tag}:v1\"] }}\n  - uses: docker/build\n    continue_on_error: true\n    with: {{ context: data-link, tags: [\"{tag}:data\"] }}\n",
        ctx = context_step("FROM scratch\nCOPY busybox /bin/busybox\nCOPY . /ctx/"),
        db = db.display(),
        data = s.data_dir().display(),
    );
    std::fs::write(s.pipelines_dir().join("links.yml"), yaml).expect("pipeline");
    crate::harness::eventually("the pipeline is loaded", || {
        s.api("GET", "/api/pipelines/links", None).0 == 200
    });
    let (run, log) = s.run_and_wait("links", json!({}));
    let _cleanup = Cleanup(vec![format!("{tag}:v1"), format!("{tag}:data")]);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let (_, link) = docker(&[
        "run",
        "--rm",
        &format!("{tag}:v1"),
        "/bin/busybox",
        "readlink",
        "/ctx/db",
    ]);
    assert_eq!(link.trim(), db.display().to_string(), "a link stays a link");
    let (read, content) = docker(&[
        "run",
        "--rm",
        &format!("{tag}:v1"),
        "/bin/busybox",
        "cat",
        "/ctx/db",
    ]);
    assert!(
        !read && !content.contains("SQLite format"),
        "the database leaked: {content}"
    );
    let steps = step_outputs(&s, run["id"].as_str().expect("id"));
    assert_eq!(steps[3]["status"], "failed", "{steps:?}");
    assert!(
        steps[3]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("data-link is not a folder (a link is not followed)"),
        "a link as the context is refused: {steps:?}"
    );
    let (exists, _) = docker(&["image", "inspect", &format!("{tag}:data")]);
    assert!(!exists, "nothing was built from the data folder");
}

/// Removes the images a test made, however it ends.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("docker")
                .args(["rmi", "-f", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The names of a service's containers on the engine, one a line.
fn container_names(service: &str) -> String {
    docker(&[
        "ps",
        "-a",
        "--format",
        "{{.Names}}",
        "--filter",
        &format!("label=skiff.service={service}"),
    ])
    .1
}

/// Removes a service's containers, however the test ends.
pub struct RemoveService(pub String);

impl Drop for RemoveService {
    fn drop(&mut self) {
        let (_, ids) = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=skiff.service={}", self.0),
        ]);
        for id in ids.split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
    }
}

/// The body of a 200 answer; none for any other answer or no answer at all.
pub fn get_text(url: &str) -> Option<String> {
    let mut answer = ureq::get(url).call().ok()?;
    answer.body_mut().read_to_string().ok()
}

/// Deploy, redeploy on the same fixed host port, and a version that never gets healthy: the
/// step fails and the version before it serves again.
#[test]
fn a_service_is_deployed_replaced_and_rolled_back_when_the_new_one_is_unhealthy() {
    let registry = Registry::start(USER, PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = unique("web");
    let service = format!("web{}", std::process::id());
    let _service = RemoveService(service.clone());
    let port = free_port();
    let yaml = versioned_web(&tag, &service, port, "3s");
    let stop = format!("steps:\n  - uses: docker/stop\n    with: {{ name: {service} }}\n");
    let start =
        format!("steps:\n  - id: start\n    uses: docker/start\n    with: {{ name: {service} }}\n");
    let remove =
        format!("steps:\n  - uses: docker/stop\n    with: {{ name: {service}, remove: true }}\n");
    let s = server_with_registry(
        &[
            ("web", &yaml),
            ("stop", &stop),
            ("start", &start),
            ("remove", &remove),
        ],
        &registry,
        dir.path(),
    );
    let _images = Cleanup(vec![
        format!("{tag}:1"),
        format!("{tag}:2"),
        format!("{tag}:3"),
    ]);
    let url = format!("http://127.0.0.1:{port}/index.html");

    let (run, log) = s.run_and_wait("web", json!({ "version": "1" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert_eq!(get_text(&url).as_deref(), Some("version 1\n"));
    let steps = step_outputs(&s, run["id"].as_str().expect("id"));
    let out = &steps[3]["outputs"];
    assert_eq!(
        out["addresses"],
        format!("http://127.0.0.1:{port}"),
        "{out}"
    );
    assert_eq!(out["container"], format!("{service}-1-1"));

    let (run, log) = s.run_and_wait("web", json!({ "version": "2" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert_eq!(get_text(&url).as_deref(), Some("version 2\n"));
    let names = container_names(&service);
    assert_eq!(
        names.trim(),
        format!("{service}-2-1"),
        "the old version is gone"
    );
    let (status, services) = s.api("GET", "/api/services", None);
    assert_eq!(status, 200, "{services}");
    let listed = services["services"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == service.as_str()).cloned())
        .unwrap_or_default();
    assert_eq!(listed["container"], format!("{service}-2-1"), "{services}");
    assert_eq!(listed["pipeline"], "web");
    assert_eq!(listed["run_number"], 2);
    // As its engine says now.
    assert_eq!(listed["state"], "running", "{services}");
    assert!(listed["state_since"].is_string(), "{services}");
    assert_eq!(listed["image"], format!("{tag}:2"), "{services}");
    assert_eq!(
        listed["addresses"],
        json!([format!("http://127.0.0.1:{port}")]),
        "{services}"
    );
    let (_, info) = docker(&["info", "-f", "{{.ID}}"]);
    assert_eq!(listed["engine"], info.trim(), "{services}");
    assert_eq!(listed["recent_runs"][0]["pipeline"], "web", "{services}");
    assert_eq!(listed["recent_runs"][0]["number"], 2, "{services}");
    assert_eq!(listed["recent_runs"][1]["number"], 1, "{services}");
    let (status, _, page) = crate::harness::raw(
        "GET",
        &s.url("/services"),
        None,
        &[(
            "authorization",
            &format!("Bearer {}", crate::harness::ADMIN_TOKEN),
        )],
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(&format!("{service}-2-1")) && page.contains("deployed by web #2"),
        "the Services page: {page}"
    );

    // Version 3 listens on another port: it never answers on 8080.
    let (run, log) = s.run_and_wait("web", json!({ "version": "3", "listen": "9999" }));
    assert_eq!(run["status"], "failed", "{run}\n{log}");
    let reason = run["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not healthy within 3s")
            && reason.contains(&format!("rolled back: {service}-2-1 serves again")),
        "{run}\n{log}"
    );
    assert_eq!(
        get_text(&url).as_deref(),
        Some("version 2\n"),
        "the previous version serves"
    );
    let names = container_names(&service);
    assert_eq!(
        names.trim(),
        format!("{service}-2-1"),
        "the unhealthy one is removed"
    );

    // Stop, start again, stop and remove.
    let (run, log) = s.run_and_wait("stop", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert_eq!(get_text(&url), None, "a stopped service does not answer");
    let (_, services) = s.api("GET", "/api/services", None);
    let listed = &services["services"][0];
    assert_eq!(listed["state"], "stopped", "{services}");
    assert!(
        listed["state_note"]
            .as_str()
            .unwrap_or_default()
            .starts_with("exit code"),
        "{services}"
    );
    let (run, log) = s.run_and_wait("start", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let steps = step_outputs(&s, run["id"].as_str().expect("id"));
    assert_eq!(steps[0]["outputs"]["container"], format!("{service}-2-1"));
    crate::harness::eventually("the started service answers", || {
        get_text(&url).as_deref() == Some("version 2\n")
    });
    // The same from the Services view: built-in runs to watch, and an exact redeploy.
    let act = |action: &str| -> Value {
        let (status, run) = s.api("POST", &format!("/api/services/{service}/{action}"), None);
        assert_eq!(status, 201, "{action}: {run}");
        s.wait_for_end(run["id"].as_str().expect("id"))
    };
    let stopped = act("stop");
    assert_eq!(stopped["status"], "succeeded", "{stopped}");
    assert_eq!(stopped["trigger"]["kind"], "service");
    assert_eq!(stopped["pipeline"], format!("service-{service}"));
    assert_eq!(get_text(&url), None, "stopped from the Services view");
    assert_eq!(act("start")["status"], "succeeded");
    crate::harness::eventually("the service answers again", || {
        get_text(&url).as_deref() == Some("version 2\n")
    });
    let redeployed = act("redeploy");
    assert_eq!(redeployed["status"], "succeeded", "{redeployed}");
    assert_eq!(
        redeployed["params"]["version"], "2",
        "an exact rerun: {redeployed}"
    );
    assert_eq!(get_text(&url).as_deref(), Some("version 2\n"));
    let (_, services) = s.api("GET", "/api/services", None);
    assert!(
        services.to_string().contains(&format!(
            "{service}-{}-1",
            redeployed["number"].as_u64().unwrap_or(0)
        )),
        "the redeployed container is the current one: {services}"
    );
    for (path, want) in [
        (format!("/api/services/{service}/explode"), 404),
        ("/api/services/no-such-service/stop".to_string(), 404),
        ("/api/services/..%2Fetc/stop".to_string(), 404),
    ] {
        let (status, body) = s.api("POST", &path, None);
        assert_eq!(status, want, "{path}: {body}");
    }

    let (run, log) = s.run_and_wait("remove", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let names = container_names(&service);
    assert_eq!(names.trim(), "", "removed");
    let (_, services) = s.api("GET", "/api/services", None);
    assert!(
        !services.to_string().contains(&service),
        "a removed service is no longer listed: {services}"
    );
    let (run, _) = s.run_and_wait("start", json!({}));
    assert_eq!(run["status"], "failed");
    assert!(
        run["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("deploy it first"),
        "{run}"
    );
}

/// The example pipeline, as the README has a new user run it: a local registry, skiff.toml
/// declaring it as `local`, Run.
#[test]
fn the_build_push_deploy_example_works_as_the_readme_says() {
    need("busybox", "busybox-static");
    let registry = Registry::start_with(None);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("skiff.toml");
    std::fs::write(
        &config,
        format!(
            "[[registry]]\nname = \"local\"\nkind = \"registry\"\nurl = \"{}\"\n",
            registry.addr
        ),
    )
    .expect("skiff.toml");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/build-push-deploy.yml"),
    )
    .expect("the example");
    let s = Server::start_with(
        &[("build-push-deploy", &example)],
        &[("SKIFF_CONFIG", config.to_str().expect("path"))],
    );
    let _service = RemoveService("hello-web".into());
    let port = free_port();
    let started = std::time::Instant::now();
    let (run, log) = s.run_and_wait("build-push-deploy", json!({ "port": port.to_string() }));
    let took = started.elapsed();
    let _images = Cleanup(vec![
        "hello-web:1".into(),
        format!("{}/hello-web:1", registry.addr),
    ]);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert_eq!(
        get_text(&format!("http://127.0.0.1:{port}/index.html")).as_deref(),
        Some("hello from skiff, run 1\n")
    );
    eprintln!("the build-push-deploy example took {} ms", took.as_millis());
}

fn skiff_reap(s: &Server, dry_run: bool) -> String {
    skiff_reap_with(s, dry_run, &[], &[])
}

/// `skiff reap` on the server's data folder with more arguments and environment.
fn skiff_reap_with(s: &Server, dry_run: bool, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.arg("reap").arg("--data").arg(s.data_dir());
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("skiff reap");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "skiff reap failed: {text}");
    text
}

/// The reaper decides from the ledger: a sleeping service (stopped on purpose) and the image it
/// runs stay; a temporary deploy past its ttl and a build nothing uses go.
#[test]
fn the_reaper_removes_what_nobody_keeps_and_leaves_sleeping_services_alone() {
    let registry = Registry::start(USER, PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = unique("reap");
    let svc = format!("reap{}", std::process::id());
    let _keep = RemoveService(format!("{svc}-keep"));
    let _temp = RemoveService(format!("{svc}-temp"));
    let yaml = format!(
        r#"steps:
{ctx}  - uses: docker/build
    with: {{ context: app, tags: ["{tag}:1"] }}
  - uses: docker/build
    with: {{ context: app, tags: ["{tag}-scratch:1"], labels: {{ kind: scratch }} }}
  - uses: docker/deploy
    with: {{ name: {svc}-keep, image: "{tag}:1", ports: ["8080"] }}
  - uses: docker/deploy
    with: {{ name: {svc}-temp, image: "{tag}:1", ports: ["8080"], ttl: 1s }}
  - uses: docker/stop
    with: {{ name: {svc}-keep }}
"#,
        ctx = context_step(DOCKERFILE)
    );
    let s = server_with_registry(&[("kit", &yaml)], &registry, dir.path());
    let _images = Cleanup(vec![format!("{tag}:1"), format!("{tag}-scratch:1")]);
    let (run, log) = s.run_and_wait("kit", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    std::thread::sleep(std::time::Duration::from_millis(1200));

    let dry = skiff_reap(&s, true);
    assert!(
        dry.contains(&format!(
            "would remove image {tag}-scratch:1: its run (kit #1) is over"
        )),
        "{dry}"
    );
    assert!(
        dry.contains(&format!(
            "would remove container {svc}-temp-1-1: its time is up"
        )),
        "{dry}"
    );
    assert!(
        !dry.contains(&format!("{svc}-keep")),
        "a sleeping service stays: {dry}"
    );
    assert!(
        !dry.contains(&format!("image {tag}:1")),
        "an image a service runs stays: {dry}"
    );
    let (exists, _) = docker(&["image", "inspect", &format!("{tag}-scratch:1")]);
    assert!(exists, "a dry run removes nothing");

    let done = skiff_reap(&s, false);
    assert!(
        done.contains(&format!("removed container {svc}-temp-1-1")),
        "{done}"
    );
    let (exists, _) = docker(&["image", "inspect", &format!("{tag}-scratch:1")]);
    assert!(!exists, "the unused build is gone");
    let (exists, _) = docker(&["container", "inspect", &format!("{svc}-temp-1-1")]);
    assert!(!exists, "the expired deploy is gone");
    let (exists, _) = docker(&["container", "inspect", &format!("{svc}-keep-1-1")]);
    assert!(exists, "the sleeping service is still there");
    let (exists, _) = docker(&["image", "inspect", &format!("{tag}:1")]);
    assert!(exists, "and the image it runs");
    assert!(
        skiff_reap(&s, false).contains("nothing to reap"),
        "twice is once"
    );
}

/// A secret given to a service goes into a file at /run/secrets/NAME, not into its environment:
/// `docker inspect` (anyone with the socket) does not show it, and neither does the run's log.
#[test]
fn a_service_gets_its_secrets_as_files_not_in_its_environment() {
    let tag = unique("sec");
    let service = format!("sec{}", std::process::id());
    let _service = RemoveService(service.clone());
    let secret = "k3y-4d1f0c9e7b-value";
    let yaml = format!(
        "steps:\n{ctx}  - uses: docker/build\n    with: {{ context: app, tags: [\"{tag}:1\"] }}\n  - id: deploy\n    uses: docker/deploy\n    with:\n      name: {service}\n      image: \"{tag}:1\"\n      env: {{ MODE: plain }}\n      secrets: {{ API_KEY: \"${{{{ secrets.API_KEY }}}}\" }}\n",
        ctx = context_step(DOCKERFILE)
    );
    let s = Server::start_with(&[("sec", &yaml)], &[("SKIFF_SECRET_API_KEY", secret)]);
    let _images = Cleanup(vec![format!("{tag}:1")]);
    let (run, log) = s.run_and_wait("sec", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let container = format!("{service}-1-1");
    let (ok, file) = docker(&[
        "exec",
        &container,
        "/bin/busybox",
        "cat",
        "/run/secrets/API_KEY",
    ]);
    assert!(ok, "{file}");
    assert_eq!(file, secret, "the file holds the secret");
    let (_, mode) = docker(&[
        "exec",
        &container,
        "/bin/busybox",
        "stat",
        "-c",
        "%a",
        "/run/secrets/API_KEY",
    ]);
    assert_eq!(mode.trim(), "444");
    let (_, inspect) = docker(&["inspect", &container]);
    assert!(inspect.contains("MODE=plain"), "env is set: {inspect}");
    assert!(!inspect.contains(secret), "docker inspect shows no secret");
    assert!(!log.contains(secret), "{log}");
}

/// A web service pipeline: `params.version` is what it serves, `params.listen` the port its
/// httpd listens on inside (anything but 8080 never gets healthy).
fn versioned_web(tag: &str, service: &str, port: u16, health_timeout: &str) -> String {
    let dockerfile = "FROM scratch\nARG PORT=8080\nENV PORT=$PORT\nCOPY busybox /bin/busybox\nCOPY www /www\nCMD [\"/bin/busybox\", \"sh\", \"-c\", \"exec /bin/busybox httpd -f -p $PORT -h /www\"]";
    format!(
        r#"params:
  version: {{ required: true }}
  listen: {{ default: "8080" }}
steps:
{ctx}  - run: echo "version $SKIFF_PARAM_VERSION" > app/www/index.html
  - id: build
    uses: docker/build
    with:
      context: app
      tags: ["{tag}:${{{{ params.version }}}}"]
      build_args: {{ PORT: "${{{{ params.listen }}}}" }}
  - id: deploy
    uses: docker/deploy
    with:
      name: {service}
      image: "{tag}:${{{{ params.version }}}}"
      ports: ["{port}:8080"]
      memory: 64m
      health: {{ port: 8080, path: /index.html, timeout: {health_timeout} }}
"#,
        ctx = context_step(dockerfile)
    )
}

/// A deploy cancelled while it waits for the new version's health: the new container goes, the
/// old one serves again, the run ends cancelled.
#[test]
fn a_deploy_cancelled_midway_leaves_the_old_version_serving() {
    let tag = unique("cancel");
    let service = format!("cancel{}", std::process::id());
    let _service = RemoveService(service.clone());
    let port = free_port();
    let s = Server::start(&[("web", &versioned_web(&tag, &service, port, "60s"))]);
    let _images = Cleanup(vec![format!("{tag}:1"), format!("{tag}:2")]);
    let url = format!("http://127.0.0.1:{port}/index.html");
    let (run, log) = s.run_and_wait("web", json!({ "version": "1" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let id = s.trigger("web", json!({ "version": "2", "listen": "9999" }));
    s.wait_for_log(&id, "waiting until it is healthy");
    let (status, _) = s.api("POST", &format!("/api/runs/{id}/cancel"), None);
    assert_eq!(status, 202);
    let run = s.wait_for_end(&id);
    assert_eq!(run["status"], "cancelled", "{run}");
    crate::harness::eventually("the old version serves again", || {
        get_text(&url).as_deref() == Some("version 1\n")
    });
    let names = container_names(&service);
    assert_eq!(
        names.trim(),
        format!("{service}-1-1"),
        "the new container is gone"
    );
}

/// The host's neighbour table follows a service's container: a stopped container's address is
/// forgotten (a client's SYN to it would otherwise go to nobody and wait out TCP's first
/// retransmit, a second), and a started one's is known before anything connects to it (a SYN
/// waiting for the address would otherwise wait for the kernel's next ask, a second).
#[test]
fn the_neighbour_table_follows_a_services_container() {
    let tag = unique("neigh");
    let service = format!("neigh{}", std::process::id());
    let _service = RemoveService(service.clone());
    let port = free_port();
    let stop = format!("steps:\n  - uses: docker/stop\n    with: {{ name: {service} }}\n");
    let start = format!("steps:\n  - uses: docker/start\n    with: {{ name: {service} }}\n");
    let s = Server::start(&[
        ("web", &versioned_web(&tag, &service, port, "10s")),
        ("stop", &stop),
        ("start", &start),
    ]);
    let _images = Cleanup(vec![format!("{tag}:1")]);
    let (run, log) = s.run_and_wait("web", json!({ "version": "1" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let container = format!("{service}-1-1");
    let address = || {
        let (ok, text) = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.MacAddress}}{{end}}",
            &container,
        ]);
        assert!(ok, "{text}");
        let mut parts = text.split_whitespace().map(str::to_string);
        (parts.next(), parts.next())
    };
    let entry = |ip: &str| {
        let out = Command::new("ip")
            .args(["-4", "neigh", "show", ip])
            .output()
            .expect("iproute2's `ip`");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Another test's container may take the address as soon as this one lets it go.
    let held_by_another = |ip: &str| {
        let (_, ids) = docker(&["ps", "-q"]);
        ids.split_whitespace().any(|id| {
            let (_, ips) = docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                id,
            ]);
            ips.split_whitespace().any(|x| x == ip)
        })
    };
    let (Some(ip), Some(mac)) = address() else {
        panic!("the service's container has no address on a bridge network");
    };
    assert!(
        entry(&ip).contains(&mac),
        "the probe reached it: {}",
        entry(&ip)
    );

    let (run, log) = s.run_and_wait("stop", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(
        entry(&ip).is_empty() || held_by_another(&ip),
        "a stopped container's address is forgotten: {}",
        entry(&ip)
    );

    let (run, log) = s.run_and_wait("start", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let (Some(ip), Some(mac)) = address() else {
        panic!("the started container has no address");
    };
    // docker/start does not probe: only the announcement put the address there.
    assert!(
        entry(&ip).contains(&format!("lladdr {mac}")),
        "a started container's address is known: {}",
        entry(&ip)
    );
}

/// The nightly teardown example, run by hand: every temporary service (deployed with a `ttl`)
/// stops, a permanent one keeps serving, and the reaper runs; its schedule is 02:00 in Madrid.
#[test]
fn the_nightly_teardown_stops_temporary_services_and_keeps_the_rest() {
    let registry = Registry::start(USER, PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = unique("night");
    let svc = format!("night{}", std::process::id());
    let _keep = RemoveService(format!("{svc}-keep"));
    let _temp = RemoveService(format!("{svc}-temp"));
    let _temp2 = RemoveService(format!("{svc}-temp2"));
    let kit = format!(
        r#"steps:
{ctx}  - uses: docker/build
    with: {{ context: app, tags: ["{tag}:1"] }}
  - uses: docker/deploy
    with: {{ name: {svc}-keep, image: "{tag}:1", ports: ["8080"] }}
  - uses: docker/deploy
    with: {{ name: {svc}-temp, image: "{tag}:1", ports: ["8080"], ttl: 1h }}
  - uses: docker/deploy
    with: {{ name: {svc}-temp2, image: "{tag}:1", ports: ["8080"], ttl: 8h }}
"#,
        ctx = context_step(DOCKERFILE)
    );
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nightly-teardown.yml"),
    )
    .expect("the example");
    let s = server_with_registry(
        &[("kit", &kit), ("nightly-teardown", &example)],
        &registry,
        dir.path(),
    );
    let _images = Cleanup(vec![format!("{tag}:1")]);
    let (run, log) = s.run_and_wait("kit", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let running = |name: &str| {
        docker(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &format!("{name}-1-1"),
        ])
        .1
        .trim()
            == "true"
    };
    assert!(running(&format!("{svc}-temp")) && running(&format!("{svc}-keep")));

    let (status, p) = s.api("GET", "/api/pipelines/nightly-teardown", None);
    assert_eq!(status, 200, "{p}");
    let next = p["triggers"]["schedules"][0]["next"][0]
        .as_str()
        .expect("a next slot")
        .to_string();
    // 02:00 in Madrid: 01:00 UTC in winter, 00:00 in summer.
    assert!(
        next.ends_with("T01:00:00Z") || next.ends_with("T00:00:00Z"),
        "{next}"
    );

    let (run, log) = s.run_and_wait("nightly-teardown", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(!running(&format!("{svc}-temp")), "{log}");
    assert!(!running(&format!("{svc}-temp2")), "{log}");
    assert!(
        running(&format!("{svc}-keep")),
        "a permanent service keeps serving: {log}"
    );
    assert!(log.contains("stopped 2 container(s)"), "{log}");
    // Stopped, not removed: a temporary service can be started again before its time is up.
    let (exists, _) = docker(&["container", "inspect", &format!("{svc}-temp-1-1")]);
    assert!(exists, "{log}");
}

/// `docker/prune` on the real engine: of what is older than `older_than`, it removes the images
/// no service owns and what skiff labelled whose ledger record was lost, and keeps a sleeping
/// service's current container, the images of its current and previous versions, and what
/// carries the label of a run this skiff does not know.
#[test]
fn prune_removes_what_no_service_owns_and_keeps_current_and_previous_versions() {
    let tag = unique("prune");
    let service = format!("prune{}", std::process::id());
    let _service = RemoveService(service.clone());
    let port = free_port();
    let scratch = format!(
        "steps:\n{ctx}  - uses: docker/build\n    with: {{ context: app, tags: [\"{tag}-scratch:1\"], labels: {{ kind: scratch }} }}\n",
        ctx = context_step(DOCKERFILE)
    );
    let prune = "params:\n  age: { default: 1h }\nsteps:\n  - id: prune\n    uses: docker/prune\n    with: { older_than: \"${{ params.age }}\" }\n";
    let dry = "steps:\n  - id: prune\n    uses: docker/prune\n    with: { older_than: 1s, dry_run: true }\n";
    let stop = format!("steps:\n  - uses: docker/stop\n    with: {{ name: {service} }}\n");
    let s = Server::start(&[
        ("web", &versioned_web(&tag, &service, port, "10s")),
        ("scratch", &scratch),
        ("prune", prune),
        ("dry", dry),
        ("stop", &stop),
    ]);
    let _images = Cleanup(vec![
        format!("{tag}:1"),
        format!("{tag}:2"),
        format!("{tag}:3"),
        format!("{tag}-scratch:1"),
    ]);
    let mut first = String::new();
    for version in ["1", "2", "3"] {
        let (run, log) = s.run_and_wait("web", json!({ "version": version }));
        assert_eq!(run["status"], "succeeded", "{run}\n{log}");
        if first.is_empty() {
            first = run["id"].as_str().expect("id").to_string();
        }
    }
    let (run, log) = s.run_and_wait("scratch", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    // Asleep on purpose: stopped and labelled is no reason to go.
    let (run, log) = s.run_and_wait("stop", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    // A container whose ledger record was lost (it carries a run of this skiff's), holding the
    // oldest image; and one labelled with a run this skiff never had (another skiff's).
    let stray = format!("{service}-stray");
    let foreign = format!("{service}-foreign");
    for (name, run, image) in [
        (&stray, first.as_str(), format!("{tag}:1")),
        (
            &foreign,
            "0190a0a0-0000-7000-8000-000000000000",
            format!("{tag}:3"),
        ),
    ] {
        let (ok, out) = docker(&[
            "create",
            "--name",
            name,
            "--label",
            &format!("skiff.run={run}"),
            "--label",
            &format!("skiff.service={service}"),
            &image,
        ]);
        assert!(ok, "{out}");
    }
    let exists = |what: &str, name: &str| docker(&[what, "inspect", name]).0;

    // Nothing is an hour old yet.
    let (run, log) = s.run_and_wait("prune", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let steps = step_outputs(&s, run["id"].as_str().expect("id"));
    assert_eq!(steps[0]["outputs"]["removed"], "0", "{log}");

    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (run, log) = s.run_and_wait("dry", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    for gone in [
        format!("would remove container {stray}: an old version of service {service}"),
        format!("would remove image {tag}:1: no service runs it (its run (web #1) is over)"),
        format!("would remove image {tag}-scratch:1: no service runs it"),
    ] {
        assert!(log.contains(&gone), "{gone}\n{log}");
    }
    assert!(log.contains("its ledger record was lost"), "{log}");
    for kept in [
        format!("{tag}:2"),
        format!("{tag}:3"),
        format!("{service}-3-1"),
        foreign.clone(),
    ] {
        assert!(!log.contains(&kept), "{kept} is kept:\n{log}");
    }
    assert!(
        exists("image", &format!("{tag}:1")),
        "a dry run removes nothing"
    );
    assert!(exists("container", &stray), "a dry run removes nothing");

    let (run, log) = s.run_and_wait("prune", json!({ "age": "1s" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let steps = step_outputs(&s, run["id"].as_str().expect("id"));
    assert_eq!(steps[0]["outputs"]["removed"], "3", "{log}");
    assert!(!exists("container", &stray), "{log}");
    assert!(!exists("image", &format!("{tag}:1")), "{log}");
    assert!(!exists("image", &format!("{tag}-scratch:1")), "{log}");
    assert!(
        exists("container", &format!("{service}-3-1")),
        "the sleeping service stays: {log}"
    );
    assert!(
        exists("image", &format!("{tag}:3")),
        "its current image: {log}"
    );
    assert!(
        exists("image", &format!("{tag}:2")),
        "its previous image: {log}"
    );
    assert!(
        exists("container", &foreign),
        "another skiff's stays: {log}"
    );
    // Pruned once: the ledger says so, and a second prune finds nothing more.
    let (run, log) = s.run_and_wait("prune", json!({ "age": "1s" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let steps = step_outputs(&s, run["id"].as_str().expect("id"));
    assert_eq!(steps[0]["outputs"]["removed"], "0", "{log}");
}

/// Every container and image on the engine that carries one of `runs`' labels, as
/// (kind, id, name): what skiff made for them, whatever its ledger says.
fn labelled_with(runs: &[&str]) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for run in runs {
        let filter = format!("label=skiff.run={run}");
        let (ok, containers) = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &filter,
            "--format",
            "{{.ID}} {{.Names}}",
        ]);
        assert!(ok, "{containers}");
        let (ok, images) = docker(&[
            "images",
            "--no-trunc",
            "--filter",
            &filter,
            "--format",
            "{{.ID}} {{.Repository}}:{{.Tag}}",
        ]);
        assert!(ok, "{images}");
        for (kind, text) in [("container", containers), ("image", images)] {
            for line in text.lines() {
                if let Some((id, name)) = line.split_once(' ') {
                    found.push((kind.to_string(), id.to_string(), name.to_string()));
                }
            }
        }
    }
    found
}

/// `skiff serve` killed with SIGKILL while a deploy waits for the new version's health (the
/// old one stopped to free the fixed host port): everything on the engine with the runs' labels
/// is in the ledger (the new container as an intent), the restarted server ends the run, and
/// the reaper removes the half-made container and starts the version it replaced again.
#[test]
fn a_worker_killed_mid_deploy_leaves_nothing_the_ledger_does_not_know() {
    let tag = unique("kill");
    let service = format!("kill{}", std::process::id());
    let _service = RemoveService(service.clone());
    let port = free_port();
    let mut s = Server::start(&[("web", &versioned_web(&tag, &service, port, "60s"))]);
    let _images = Cleanup(vec![format!("{tag}:1"), format!("{tag}:2")]);
    let url = format!("http://127.0.0.1:{port}/index.html");
    let (run, log) = s.run_and_wait("web", json!({ "version": "1" }));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let first = run["id"].as_str().expect("id").to_string();
    // Version 2 never answers on 8080: the deploy waits for it.
    let second = s.trigger("web", json!({ "version": "2", "listen": "9999" }));
    s.wait_for_log(&second, "waiting until it is healthy");
    s.crash();

    let mut s = s.restart();
    let run = s.wait_for_end(&second);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{run}"
    );
    let (status, ledger) = s.api("GET", "/api/resources", None);
    assert_eq!(status, 200, "{ledger}");
    let records = ledger["resources"].as_array().cloned().unwrap_or_default();
    let found = labelled_with(&[&first, &second]);
    assert!(
        found
            .iter()
            .any(|(kind, _, name)| kind == "container" && *name == format!("{service}-2-1")),
        "the half-made container is on the engine: {found:?}"
    );
    for (kind, id, name) in &found {
        let known = records.iter().any(|r| {
            r["kind"] == kind.as_str()
                && r["state"] != "removed"
                && (r["external_id"] == id.as_str()
                    || (r["external_id"].is_null() && r["name"] == name.as_str()))
        });
        assert!(
            known,
            "{kind} {name} ({id}) is on the engine but not in the ledger: {ledger}"
        );
    }
    let intent = records
        .iter()
        .find(|r| r["name"] == format!("{service}-2-1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        intent["state"], "creating",
        "recorded before it was made: {ledger}"
    );
    assert_eq!(intent["run"], second.as_str());

    let reaped = skiff_reap(&s, false);
    assert!(
        reaped.contains(&format!("removed container {service}-2-1")),
        "{reaped}"
    );
    assert!(
        reaped.contains(&format!("started {service}-1-1 again")),
        "the version the deploy stopped serves again: {reaped}"
    );
    crate::harness::eventually("the old version serves again", || {
        get_text(&url).as_deref() == Some("version 1\n")
    });
    assert_eq!(
        container_names(&service).trim(),
        format!("{service}-1-1"),
        "the half-made container is gone"
    );
    // The built image of the interrupted run goes with it (no service runs it); the one
    // serving stays.
    let (exists, _) = docker(&["image", "inspect", &format!("{tag}:2")]);
    assert!(!exists, "{reaped}");
    let (exists, _) = docker(&["image", "inspect", &format!("{tag}:1")]);
    assert!(exists, "{reaped}");
    s.stop();
}

/// Kills a helper daemon (stunnel, sshd) however the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    crate::harness::eventually(&format!("{what} listens on {port}"), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before listening");
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl in `dir`.
fn certificates(dir: &Path) {
    need("openssl", "openssl");
    let openssl = |args: &[&str]| run_ok(Command::new("openssl").args(args).current_dir(dir));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509", "-days", "1", "-subj", "/CN=skiff test CA"][..],
            &ec[..],
            &["-keyout", "ca-key.pem", "-out", "ca.pem"][..],
        ]
        .concat(),
    );
    for (name, cn, usage) in [
        (
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "skiff", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), usage).expect("ext");
        openssl(
            &[
                &["req", "-subj", &format!("/CN={cn}")][..],
                &ec[..],
                &[
                    "-keyout",
                    &format!("{name}-key.pem"),
                    "-out",
                    &format!("{name}.csr"),
                ][..],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

/// `docker/deploy`, `docker/stop` and `docker/start` on engines reached over TLS (stunnel checking
/// client certificates in front of this machine's engine: a second dockerd was not tried) and
/// over SSH (Debian's sshd on a loopback port running `docker system dial-stdio`), by a skiff
/// whose own engine socket does not exist: every step reaches the service's engine through
/// the ledger's record of it and the config's `[[engine]]`. The health probe of the ssh engine
/// runs on its host (`ssh -W`).
#[test]
fn deploy_stop_and_start_on_remote_engines_over_tls_and_ssh() {
    need("stunnel", "stunnel4");
    need("ssh-keygen", "openssh-client");
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "/usr/sbin/sshd is missing: install Debian's openssh-server (.ci/run does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // TLS: stunnel asks for a client certificate signed by the test CA (socat's TLS cannot
    // serve a client that resumes sessions when it checks certificates: "session id context
    // uninitialized").
    certificates(d);
    let tls_port = free_port();
    std::fs::write(
        d.join("stunnel.conf"),
        format!(
            "foreground = yes\npid =\n[docker]\naccept = 127.0.0.1:{tls_port}\nconnect = {socket}\ncert = {0}/server.pem\nkey = {0}/server-key.pem\nCAfile = {0}/ca.pem\nverifyChain = yes\n",
            d.display(),
            socket = skiff_socket()
        ),
    )
    .expect("stunnel.conf");
    let mut stunnel = Command::new("stunnel")
        .arg(d.join("stunnel.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stunnel");
    wait_for_port(tls_port, &mut stunnel, "stunnel");
    let _stunnel = Daemon(stunnel);

    // SSH: sshd with a host key of its own and one authorized client key.
    let keygen = |name: &str| {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(d.join(name)),
        );
        d.join(name)
    };
    let host_key = keygen("host");
    let client_key = keygen("client");
    std::fs::copy(client_key.with_extension("pub"), d.join("authorized_keys")).expect("keys");
    let ssh_port = free_port();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n",
            host_key.display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display()
        ),
    )
    .expect("sshd_config");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let mut daemon = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd");
    wait_for_port(ssh_port, &mut daemon, "sshd");
    let _sshd = Daemon(daemon);
    let public = std::fs::read_to_string(host_key.with_extension("pub")).expect("pub");
    let mut parts = public.split_whitespace();
    std::fs::write(
        d.join("known_hosts"),
        format!(
            "[127.0.0.1]:{ssh_port} {} {}\n",
            parts.next().expect("type"),
            parts.next().expect("key")
        ),
    )
    .expect("known_hosts");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let tls_host = format!("tcp://127.0.0.1:{tls_port}");
    let ssh_host = format!("ssh://{user}@127.0.0.1:{ssh_port}");
    std::fs::write(
        d.join("skiff.toml"),
        format!(
            "[[engine]]\nhost = \"{tls_host}\"\ntls_ca = \"{0}/ca.pem\"\ntls_cert = \"{0}/client.pem\"\ntls_key = \"{0}/client-key.pem\"\n\n[[engine]]\nhost = \"{ssh_host}\"\nssh_key = \"{1}\"\nknown_hosts = \"{0}/known_hosts\"\n",
            d.display(),
            client_key.display()
        ),
    )
    .expect("skiff.toml");

    // The image, built here with the docker CLI (skiff's own engine socket will be missing).
    let tag = unique("remote");
    let ctx = d.join("ctx");
    std::fs::create_dir_all(ctx.join("www")).expect("ctx");
    std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("busybox");
    std::fs::write(ctx.join("www/index.html"), "remote\n").expect("index");
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    let (ok, out) = docker(&[
        "build",
        "-q",
        "-t",
        &format!("{tag}:1"),
        ctx.to_str().expect("ctx"),
    ]);
    assert!(ok, "{out}");
    let _images = Cleanup(vec![format!("{tag}:1")]);

    let pid = std::process::id();
    let mut pipelines = Vec::new();
    let mut services = Vec::new();
    for (kind, host) in [("tls", &tls_host), ("ssh", &ssh_host)] {
        let service = format!("{kind}{pid}");
        let port = free_port();
        pipelines.push((
            format!("deploy-{kind}"),
            format!(
                "steps:\n  - id: deploy\n    uses: docker/deploy\n    with: {{ name: {service}, host: \"{host}\", image: \"{tag}:1\", ports: [\"{port}:8080\"], health: {{ port: 8080, path: /index.html, timeout: 20s }} }}\n"
            ),
        ));
        for action in ["stop", "start"] {
            pipelines.push((
                format!("{action}-{kind}"),
                format!("steps:\n  - id: {action}\n    uses: docker/{action}\n    with: {{ name: {service} }}\n"),
            ));
        }
        services.push((kind, service, port, host.clone()));
    }
    // A temporary service on the ssh engine, for the reaper (also from the ledger).
    let temporary = format!("tmp{pid}");
    pipelines.push((
        "temporary".into(),
        format!("steps:\n  - uses: docker/deploy\n    with: {{ name: {temporary}, host: \"{ssh_host}\", image: \"{tag}:1\", ports: [\"8080\"], ttl: 1s }}\n"),
    ));
    pipelines.push(("reap".into(), "steps:\n  - uses: docker/reap\n".into()));
    services.push(("tmp", temporary.clone(), 0, ssh_host.clone()));
    pipelines.push((
        "badhost".into(),
        format!("steps:\n  - uses: docker/deploy\n    with: {{ name: bad{pid}, host: \"http://127.0.0.1:2375\", image: \"{tag}:1\" }}\n"),
    ));
    pipelines.push((
        "undeclared".into(),
        format!("steps:\n  - uses: docker/deploy\n    with: {{ name: nowhere{pid}, host: \"tcp://127.0.0.1:1\", image: \"{tag}:1\" }}\n"),
    ));
    let _cleanup: Vec<RemoveService> = services
        .iter()
        .map(|(_, s, _, _)| RemoveService(s.clone()))
        .collect();
    let refs: Vec<(&str, &str)> = pipelines
        .iter()
        .map(|(n, y)| (n.as_str(), y.as_str()))
        .collect();
    let no_engine = format!("unix://{}/no-engine.sock", d.display());
    let config = d.join("skiff.toml");
    let s = Server::start_with(
        &refs,
        &[
            ("SKIFF_CONFIG", config.to_str().expect("path")),
            ("DOCKER_HOST", &no_engine),
        ],
    );
    let (_, engine_id) = docker(&["info", "-f", "{{.ID}}"]);

    for (kind, service, port, host) in services.iter().filter(|s| s.0 != "tmp") {
        let url = format!("http://127.0.0.1:{port}/index.html");
        let (run, log) = s.run_and_wait(&format!("deploy-{kind}"), json!({}));
        assert_eq!(run["status"], "succeeded", "{kind}: {run}\n{log}");
        assert!(log.contains(&format!("deploying on {host}")), "{log}");
        assert_eq!(get_text(&url).as_deref(), Some("remote\n"), "{kind}");
        let (_, ledger) = s.api("GET", &format!("/api/resources?service={service}"), None);
        let container = &ledger["resources"]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["kind"] == "container").cloned())
            .unwrap_or_default();
        assert_eq!(container["state"], "live", "{ledger}");
        assert_eq!(container["engine"], engine_id.trim(), "{ledger}");
        let (_, engines) = s.api("GET", "/api/resources", None);
        assert!(
            engines["resources"].as_array().is_some_and(|l| l
                .iter()
                .any(|r| r["kind"] == "engine" && r["name"] == host.as_str())),
            "how the engine was reached is recorded: {engines}"
        );

        // The Services view asks the engine where the ledger says the service is.
        let (_, listed) = s.api("GET", "/api/services", None);
        let shown = listed["services"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["name"] == service.as_str()).cloned())
            .unwrap_or_default();
        assert_eq!(shown["state"], "running", "{listed}");
        assert_eq!(shown["state_note"], format!("on {host}"), "{listed}");
        let (run, log) = s.run_and_wait(&format!("stop-{kind}"), json!({}));
        assert_eq!(run["status"], "succeeded", "{kind}: {run}\n{log}");
        assert!(log.contains(&format!("on {host}")), "{log}");
        assert_eq!(get_text(&url), None, "{kind}: stopped");
        let (run, log) = s.run_and_wait(&format!("start-{kind}"), json!({}));
        assert_eq!(run["status"], "succeeded", "{kind}: {run}\n{log}");
        crate::harness::eventually("the service answers again", || {
            get_text(&url).as_deref() == Some("remote\n")
        });
    }
    let (run, log) = s.run_and_wait("temporary", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    // `skiff reap` by hand reaches the engines the config declares (here both hosts reach one
    // engine, reaped once, by the first), beside the local one (missing here, so skipped).
    let said = skiff_reap_with(
        &s,
        true,
        &["--config", config.to_str().expect("path")],
        &[("DOCKER_HOST", &no_engine)],
    );
    assert!(
        said.contains(&format!(
            "would remove container {temporary}-1-1 on {ssh_host}"
        )),
        "{said}"
    );
    assert_eq!(said.matches("would remove container").count(), 1, "{said}");
    assert!(said.contains("skipping the local engine"), "{said}");
    let (run, log) = s.run_and_wait("reap", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    // The engine is reached by whichever declared host the ledger names first.
    assert!(
        log.contains(&format!("removed container {temporary}-1-1 on "))
            && log.contains("its time is up"),
        "{log}"
    );
    assert!(log.contains("skipping this worker's own engine"), "{log}");
    assert_eq!(container_names(&temporary).trim(), "", "{log}");

    // A host that is no engine's form is found when the pipeline loads.
    let (_, bad) = s.api("GET", "/api/pipelines/badhost", None);
    assert!(bad.to_string().contains("is not an engine host"), "{bad}");
    let (run, log) = s.run_and_wait("undeclared", json!({}));
    assert_eq!(run["status"], "failed", "{run}\n{log}");
    assert!(
        run["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("engine `tcp://127.0.0.1:1` is not declared in skiff's config"),
        "{run}"
    );
}

/// The engine socket this machine's docker CLI uses.
fn skiff_socket() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".into())
}
