//! The web UI in real headless Chromium, driven over WebDriver (Debian's chromium-driver):
//! sign in with the one-time link, fill a param, press Run, watch the run live, cancel a long run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Server;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(20);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session on a chromedriver this test started; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
}

impl Browser {
    fn start() -> Browser {
        Self::start_with(json!({}))
    }

    /// A phone: chromedriver's `mobileEmulation` (touch, a device pixel ratio of 2, `width` CSS
    /// pixels wide).
    fn phone(width: u32) -> Browser {
        Self::start_with(json!({ "mobileEmulation": { "deviceMetrics": {
            "width": width, "height": 640, "pixelRatio": 2.0, "touch": true } } }))
    }

    /// A browser with more `goog:chromeOptions`.
    fn start_with(options: Value) -> Browser {
        for program in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                std::path::Path::new(program).exists(),
                "{program} is missing: install Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("addr")
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let until = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "chromedriver did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
        };
        let mut chrome = json!({ "binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"] });
        if let (Some(c), Some(more)) = (chrome.as_object_mut(), options.as_object()) {
            c.extend(more.clone());
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": chrome
        } } });
        let value = browser.send("POST", "/session", Some(caps));
        browser.session = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser
    }

    /// A WebDriver call; `Err` holds WebDriver's error name (`stale element reference`...).
    fn try_send(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.post(&url).send_json(body.unwrap_or(json!({}))),
        };
        let mut response = response.expect("WebDriver call");
        let status = response.status().as_u16();
        let value: Value = response.body_mut().read_json().expect("WebDriver JSON");
        if status >= 400 {
            return Err(format!(
                "{}: {}",
                value["value"]["error"].as_str().unwrap_or("error"),
                value["value"]["message"]
            ));
        }
        Ok(value["value"].clone())
    }

    fn send(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_send(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.send(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Finds an element, waiting for it to appear.
    fn find(&self, css: &str) -> String {
        let until = Instant::now() + WAIT;
        loop {
            let url = format!("{}/session/{}/element", self.base, self.session);
            let mut r = self
                .agent
                .post(&url)
                .send_json(json!({ "using": "css selector", "value": css }))
                .expect("find");
            let v: Value = r.body_mut().read_json().expect("json");
            if let Some(id) = v["value"][ELEMENT].as_str() {
                return id.to_string();
            }
            assert!(
                Instant::now() < until,
                "no element `{css}` appeared on {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/click"), None);
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/clear"), None);
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// The element's text. The page may be replaced between finding the element and reading it
    /// (a form posts and redirects): then the element is found again, until the deadline.
    fn text(&self, css: &str) -> String {
        let until = Instant::now() + WAIT;
        loop {
            let id = self.find(css);
            match self.try_send(
                "GET",
                &format!("/session/{}/element/{id}/text", self.session),
                None,
            ) {
                Ok(v) => return v.as_str().unwrap_or("").to_string(),
                Err(e) if Instant::now() < until => eprintln!("reading `{css}` again after: {e}"),
                Err(e) => panic!("reading the text of `{css}`: {e}"),
            }
        }
    }

    /// Waits until the element's text contains `needle`.
    fn wait_text(&self, css: &str, needle: &str) {
        let until = Instant::now() + WAIT;
        loop {
            let text = self.text(css);
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < until,
                "`{css}` never showed {needle:?}; it shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let b64 = self.cmd("GET", "/screenshot", None);
        let bytes = decode_base64(b64.as_str().expect("base64"));
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(&format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for group in digits.chunks(4) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | (d << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..group.len()]);
    }
    out
}

#[test]
fn run_a_pipeline_from_the_browser_and_cancel_a_long_one() {
    let server = Server::start(&[
        (
            "greet",
            "description: Greets someone\nparams:\n  who: { default: world, description: Who to greet }\n  mood: { options: [cheerful, calm], default: calm }\nsteps:\n  - name: Say hello\n    run: |\n      for i in $(seq 1 30); do echo \"hello $SKIFF_PARAM_WHO, line $i\"; done\n      printf '\\033[32mgreen text\\033[0m and <b>not bold</b>\\n'\n  - name: Mood\n    if: params.mood == 'cheerful'\n    run: echo very cheerful\n",
        ),
        (
            "long",
            "steps:\n  - name: Wait a long time\n    run: |\n      echo started\n      sleep 1000\nfinally:\n  - name: Tidy up\n    run: echo tidied\n",
        ),
    ]);
    let b = Browser::start();
    b.goto(&server.login_link);
    b.wait_text("main", "greet");
    assert!(
        b.url().ends_with('/'),
        "the login link lands on the dashboard: {}",
        b.url()
    );

    // Fill a param and press Run.
    b.goto(&server.url("/pipelines/greet"));
    b.type_into("input[name='param.who']", "browser");
    b.js("document.querySelector(\"select[name='param.mood']\").value = 'cheerful';");
    b.click("#run-form button[type=submit]");
    b.find("#log");
    assert!(
        b.url().contains("/runs/"),
        "Run leads to the run page: {}",
        b.url()
    );
    b.wait_text("#run-status", "succeeded");
    b.wait_text("#log", "hello browser, line 30");
    b.wait_text("#log", "very cheerful");
    let html = b.js("return document.getElementById('log').innerHTML;");
    assert!(
        html.as_str()
            .is_some_and(|h| h.contains("&lt;b&gt;not bold&lt;/b&gt;")),
        "log text is escaped"
    );
    assert!(
        html.as_str().is_some_and(|h| h.contains("<span")),
        "ANSI colours become spans"
    );
    let steps =
        b.js("return Array.from(document.querySelectorAll('#steps .step')).map(e => e.className);");
    assert_eq!(
        steps,
        json!(["step succeeded", "step succeeded"]),
        "steps show their status"
    );
    let line =
        b.js("return document.getElementById('L3') && document.getElementById('L3').textContent;");
    assert!(
        line.as_str().is_some_and(|t| t.contains("line 3")),
        "lines have linkable numbers: {line}"
    );
    let shot = b.screenshot("run-page.png");
    eprintln!("screenshot: {}", shot.display());

    // A long run, cancelled from its page.
    b.goto(&server.url("/pipelines/long"));
    b.click("#run-form button[type=submit]");
    b.wait_text("#log", "started");
    b.wait_text("#run-status", "running");
    b.click("#cancel");
    b.wait_text("#run-status", "cancelled");
    b.wait_text("#log", "tidied");
    let cancel_shown = b.js("return document.getElementById('cancel-form').offsetParent !== null;");
    assert_eq!(
        cancel_shown,
        json!(false),
        "Cancel disappears when the run has ended"
    );

    // The same page on a phone-sized screen.
    b.cmd(
        "POST",
        "/window/rect",
        Some(json!({ "width": 390, "height": 844 })),
    );
    b.goto(&b.url());
    b.wait_text("#log", "tidied");
    let overflow = b.js("return document.documentElement.scrollWidth <= window.innerWidth + 1;");
    assert_eq!(overflow, json!(true), "no sideways scrolling on a phone");
    b.screenshot("run-page-phone.png");
}

#[test]
fn a_log_of_100000_lines_stays_usable() {
    let server = Server::start(&[(
        "big",
        "steps:\n  - run: seq -f 'line %06g of a long log' 1 100000\n",
    )]);
    let id = server.trigger("big", json!({}));
    server.follow(&id, None);
    let b = Browser::start();
    b.goto(&server.login_link);
    let started = Instant::now();
    b.goto(&server.url(&format!("/runs/{id}")));
    b.wait_text("#log-state", "100000 lines");
    let loaded = started.elapsed();
    let open =
        b.js("return document.querySelector('#log .step-head').getAttribute('aria-expanded');");
    assert_eq!(open, json!("true"), "a run's only step stays open");
    let blocks = b.js("return document.querySelectorAll('#log .block').length;");
    assert_eq!(blocks, json!(200), "lines are grouped in blocks of 500");
    // Search stays quick: a query matching every line is one pass, not a re-render.
    let took = b.js("const f = document.getElementById('find'); f.value = 'of a long'; const t = performance.now(); f.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter' })); return [performance.now() - t, document.getElementById('found').textContent];");
    assert_eq!(took[1], json!("1 of 100000"), "every line matches once");
    let ms = took[0].as_f64().unwrap_or(f64::MAX);
    assert!(ms < 1000.0, "searching 100,000 lines took {ms} ms");
    b.type_into("#find", "line 099999 ");
    b.wait_js(
        "return document.getElementById('found').textContent;",
        json!("1 of 1"),
    );
    let hit = b.js("const e = document.querySelector('#log .found'); const r = e.getBoundingClientRect(); return [e.id, r.top >= 0 && r.bottom <= window.innerHeight];");
    assert_eq!(hit, json!(["L99999", true]), "the match is shown");
    eprintln!("100,000-line log: searched in {ms:.0} ms");
    // Open a line far down by its link, as a shared link would.
    b.goto(&server.url("/"));
    let started = Instant::now();
    b.goto(&server.url(&format!("/runs/{id}#L99999")));
    b.wait_text("#log-state", "100000 lines");
    let shown = b.js("const e = document.getElementById('L99999'); const r = e.getBoundingClientRect(); return [e.classList.contains('hl'), r.top >= 0 && r.bottom <= window.innerHeight];");
    assert_eq!(
        shown,
        json!([true, true]),
        "the linked line is highlighted and on screen"
    );
    eprintln!(
        "100,000-line log: loaded and rendered in {loaded:?}; reloaded at line 99,999 in {:?}",
        started.elapsed()
    );
}

/// What a reader can reach with a finger: these controls (not links inside a sentence, not the
/// log's line numbers) are at least 44 x 44 px; the ones that are smaller, as "selector WxH".
const SMALL_TARGETS: &str = r#"
const sel = 'header.top a, header.top button, main button, main .button, .run-row, .dot, .last-run, .step .name, main select, main input[type=text], main input[type=password], .card .title, .ways a';
return Array.from(document.querySelectorAll(sel)).filter(e => {
  const r = e.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) return false;
  return r.height < 43.5 || r.width < 43.5;
}).map(e => { const r = e.getBoundingClientRect(); return e.tagName + '.' + e.className + ' "' + e.textContent.trim().slice(0, 20) + '" ' + Math.round(r.width) + 'x' + Math.round(r.height); });
"#;

/// Whether the document scrolls sideways: (scrollWidth, clientWidth).
const SIDEWAYS: &str =
    "const e = document.scrollingElement; return [e.scrollWidth, e.clientWidth];";

#[test]
fn on_a_phone_320px_wide_nothing_scrolls_sideways_and_targets_are_44px() {
    let server = Server::start_with(
        &[
            (
                "a-pipeline-with-a-rather-long-name-for-a-phone",
                "description: Prints long lines\nparams:\n  who: { default: world }\nsteps:\n  - name: A step whose name is long enough to wrap on any phone screen at all\n    run: |\n      echo \"$(printf 'x%.0s' $(seq 1 300))\"\n      echo done\n",
            ),
            (
                "slow",
                "steps:\n  - name: Wait\n    run: |\n      echo started\n      sleep 1000\n",
            ),
            ("x?y#z", "stpes: []\n"),
            (
                "nightly",
                "on:\n  webhook: { secret: \"${{ secrets.HOOK }}\" }\n  schedule:\n    - { cron: \"0 2 * * *\", timezone: Europe/Madrid, missed: once }\nsteps:\n  - run: \"true\"\n",
            ),
        ],
        &[("SKIFF_SECRET_HOOK", "phone-secret")],
    );
    // A delivery with a long unbroken body line, for the Deliveries pages.
    let payload = format!(
        "{{\"ref\":\"refs/heads/main\",\"after\":\"{}\"}}",
        "a".repeat(400)
    );
    let (status, answer) = crate::harness::call(
        "POST",
        &server.url("/hooks/nightly"),
        Some(&payload),
        &[
            ("x-skiff-event", "push"),
            ("x-skiff-delivery", "phone-1"),
            ("x-skiff-signature-256", "00"),
        ],
    );
    assert_eq!(status, 401, "{answer}");
    let (_, log) = server.api("GET", "/api/deliveries", None);
    let delivery = log["deliveries"][0]["key"]
        .as_str()
        .expect("logged")
        .to_string();
    let (done, _) =
        server.run_and_wait("a-pipeline-with-a-rather-long-name-for-a-phone", json!({}));
    let done = done["id"].as_str().expect("id").to_string();
    let slow = server.trigger("slow", json!({}));
    server.wait_for_log(&slow, "started");
    let b = Browser::phone(320);
    b.goto(&server.login_link);
    b.wait_text("main", "slow");
    let pages = [
        ("dashboard", "/".to_string()),
        ("runs", "/runs".to_string()),
        (
            "pipeline",
            "/pipelines/a-pipeline-with-a-rather-long-name-for-a-phone".to_string(),
        ),
        ("invalid", "/pipelines/x%3Fy%23z".to_string()),
        ("run", format!("/runs/{done}")),
        ("live-run", format!("/runs/{slow}")),
        ("settings", "/settings".to_string()),
        ("error", "/runs/no-such-run".to_string()),
        ("scheduled", "/pipelines/nightly".to_string()),
        ("deliveries", "/deliveries".to_string()),
        ("delivery", format!("/deliveries/{delivery}")),
    ];
    let mut problems = Vec::new();
    for (name, path) in &pages {
        b.goto(&server.url(path));
        b.find("main");
        if path.starts_with("/runs/") && name != &"error" {
            b.wait_text("#log-state", "line");
        }
        let width = b.js("return window.innerWidth;");
        assert_eq!(width, json!(320), "the phone is 320 px wide");
        let sideways = b.js(SIDEWAYS);
        if sideways[0].as_i64() > sideways[1].as_i64() {
            problems.push(format!("{name}: scrolls sideways {sideways}"));
        }
        let small = b.js(SMALL_TARGETS);
        if small.as_array().is_some_and(|a| !a.is_empty()) {
            problems.push(format!("{name}: small targets {small}"));
        }
        let shot = b.screenshot(&format!("phone-320-{name}.png"));
        eprintln!("screenshot: {}", shot.display());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let status = b.js(
        "return document.querySelector('.badge') && document.querySelector('.badge').textContent;",
    );
    eprintln!("a status on the error page? {status}");
}

#[test]
fn the_run_page_keeps_its_head_in_view_and_its_times_tick() {
    let server = Server::start(&[
        (
            "many",
            "steps:\n  - name: Count\n    run: seq -f 'line %g' 1 300\n  - name: Second\n    run: seq -f 'more %g' 1 100\n",
        ),
        (
            "slow",
            "steps:\n  - name: Print then wait\n    run: |\n      seq -f 'live line %g' 1 200\n      sleep 1000\n",
        ),
    ]);
    let (done, _) = server.run_and_wait("many", json!({}));
    let done = done["id"].as_str().expect("id").to_string();
    // Notifications allowed, as a reader who said yes once would have them.
    let b = Browser::start_with(json!({ "prefs": {
        "profile.default_content_setting_values.notifications": 1 } }));
    b.goto(&server.login_link);
    b.find("main");

    // An error page is a page, with a way back.
    b.goto(&server.url("/runs/no-such-run"));
    b.wait_text("#error", "Not found");
    b.click(".ways a[href='/']");
    b.wait_text("main h1", "Pipelines");

    // A finished run opens at its head, which stays in view when the reader goes down the log.
    b.goto(&server.url(&format!("/runs/{done}")));
    b.wait_text("#log-state", "400 lines");
    let in_view = "const v = id => { const r = document.getElementById(id).getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight && r.height > 0; }; return [v('run-status'), v('rerun'), v('run-took'), Math.round(window.scrollY)];";
    assert_eq!(
        b.js(in_view),
        json!([true, true, true, 0]),
        "opened at the head, not at the end of the log"
    );
    let title = b.js("return document.title;");
    assert!(
        title
            .as_str()
            .is_some_and(|t| t.starts_with("✓ many #1 succeeded")),
        "the tab says how the run went: {title}"
    );
    b.js("window.scrollTo(0, document.documentElement.scrollHeight);");
    let v = b.js(in_view);
    assert_eq!(
        (&v[0], &v[1]),
        (&json!(true), &json!(true)),
        "the head stays in view at the end: {v}"
    );
    // A step's anchor lands below the sticky head, not under it.
    b.js("window.scrollTo(0, 0);");
    b.click("#step-1 .name");
    std::thread::sleep(Duration::from_millis(300));
    let below = b.js("const h = document.getElementById('run-head').getBoundingClientRect(); const s = document.getElementById('L-step-1').getBoundingClientRect(); return [Math.round(h.bottom), Math.round(s.top)];");
    assert!(
        below[1].as_i64() >= below[0].as_i64() && below[1].as_i64() < Some(400),
        "the step's log starts below the head: head bottom, step top = {below}"
    );
    b.screenshot("run-finished-head.png");

    // A live run: its duration ticks, its tab shows it running, the end of its log is followed
    // while the reader is there, and Cancel stays in reach.
    let slow = server.trigger("slow", json!({}));
    server.wait_for_log(&slow, "live line 200");
    b.goto(&server.url(&format!("/runs/{slow}")));
    b.wait_text("#log", "live line 200");
    let title = b.js("return document.title;");
    assert!(
        title.as_str().is_some_and(|t| t.contains("running")),
        "{title}"
    );
    let took = b.text("#run-took");
    std::thread::sleep(Duration::from_millis(2100));
    let later = b.text("#run-took");
    assert_ne!(took, later, "the duration ticks while the run runs");
    let cancel = b.js("const r = document.getElementById('cancel').getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight;");
    assert_eq!(cancel, json!(true), "Cancel is in reach");
    // "Notify me when it ends": the reader looks away (the tab hidden), and the end of the run
    // reaches them as a notification (recorded here where the system would show it).
    b.click("#notify");
    assert_eq!(
        b.js("return document.getElementById('notify').getAttribute('aria-pressed');"),
        json!("true")
    );
    b.js("Object.defineProperty(document, 'hidden', { get: () => true }); window.shown = []; window.Notification = function (title, o) { window.shown.push([title, o.body, o.tag]); }; window.Notification.permission = 'granted';");
    // Cancelled from elsewhere (the Cancel button's form would reload this page).
    let (status, _) = server.api("POST", &format!("/api/runs/{slow}/cancel"), None);
    assert_eq!(status, 202);
    b.wait_text("#run-status", "cancelled");
    let shown = b.js("return window.shown;");
    assert!(
        shown[0][0]
            .as_str()
            .is_some_and(|t| t.contains("slow #1 cancelled")),
        "the end of the run is told: {shown}"
    );
    assert_eq!(shown.as_array().map(Vec::len), Some(1), "once: {shown}");
    assert_eq!(
        b.js("return document.getElementById('notify').hidden;"),
        json!(true)
    );
    let title = b.js("return document.title;");
    assert!(
        title.as_str().is_some_and(|t| t.contains("cancelled")),
        "{title}"
    );
    let took = b.text("#run-took");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        took,
        b.text("#run-took"),
        "an ended run's duration stands still"
    );
    let wait = b.text("#run-wait");
    assert!(!wait.is_empty(), "the queue wait is shown");
    // Times read relative, with the absolute time on hover.
    let time = b
        .js("const t = document.querySelector('.run-meta time'); return [t.textContent, t.title];");
    assert_eq!(time[0], json!("just now"), "{time}");
    assert!(time[1].as_str().is_some_and(|t| t.len() > 8), "{time}");
}

#[test]
fn the_runs_page_filters_in_the_browser() {
    let server = Server::start(&[
        ("good", "steps:\n  - run: \"true\"\n"),
        ("bad", "steps:\n  - run: exit 1\n"),
    ]);
    for p in ["good", "bad", "good", "bad", "good"] {
        server.run_and_wait(p, json!({}));
    }
    let b = Browser::start();
    b.goto(&server.login_link);
    b.find("main");
    b.goto(&server.url("/runs"));
    let count = "return document.querySelectorAll('#runs .run-row').length;";
    assert_eq!(b.js(count), json!(5));
    b.js("document.querySelector(\"select[name='status']\").value = 'failed';");
    b.click("#filters button[type=submit]");
    b.wait_text("main", "Clear");
    assert!(b.url().contains("status=failed"), "{}", b.url());
    assert_eq!(b.js(count), json!(2));
    let statuses = b.js("return Array.from(document.querySelectorAll('#runs .run-row')).map(e => e.dataset.status);");
    assert_eq!(statuses, json!(["failed", "failed"]));
    b.js("document.querySelector(\"select[name='status']\").value = ''; document.querySelector(\"select[name='pipeline']\").value = 'good';");
    b.click("#filters button[type=submit]");
    b.wait_text("main", "Clear");
    assert_eq!(b.js(count), json!(3));
    // A row is one link to its run.
    b.click("#runs .run-row");
    b.find("#run-head");
    assert!(b.url().contains("/runs/"), "{}", b.url());
}

/// The Services view in the browser: a deployed service is listed; Stop stops it (a run to
/// watch); Start starts it again.
#[test]
fn the_services_view_stops_and_starts_a_service() {
    use crate::docker::{
        Cleanup, DOCKERFILE, RemoveService, context_step, free_port, get_text, unique,
    };
    let tag = unique("ui");
    let service = format!("ui{}", std::process::id());
    let _service = RemoveService(service.clone());
    let port = free_port();
    let yaml = format!(
        "steps:\n{ctx}  - uses: docker/build\n    with: {{ context: app, tags: [\"{tag}:1\"] }}\n  - uses: docker/deploy\n    with: {{ name: {service}, image: \"{tag}:1\", ports: [\"{port}:8080\"], health: {{ port: 8080, path: /index.html }} }}\n",
        ctx = context_step(DOCKERFILE)
    );
    let server = Server::start(&[("site", &yaml)]);
    let _images = Cleanup(vec![format!("{tag}:1")]);
    let (run, log) = server.run_and_wait("site", json!({}));
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    let url = format!("http://127.0.0.1:{port}/index.html");
    assert!(get_text(&url).is_some(), "deployed");

    let b = Browser::start();
    b.goto(&server.login_link);
    b.find("main");
    b.goto(&server.url("/services"));
    b.wait_text("#services", &format!("{service}-1-1"));
    b.wait_text("#services", "running since");
    b.wait_text("#services", &format!("image {tag}:1"));
    b.screenshot("services.png");
    // Stopped and started elsewhere (the API): the open page follows, without a reload.
    let marker = "window.__notReloaded = true; return true;";
    b.js(marker);
    for (action, state) in [("stop", "stopped since"), ("start", "running since")] {
        let (status, run) = server.api("POST", &format!("/api/services/{service}/{action}"), None);
        assert_eq!(status, 201, "{run}");
        server.wait_for_end(run["id"].as_str().expect("id"));
        b.wait_text("#services", state);
    }
    assert_eq!(
        b.js("return window.__notReloaded === true;"),
        json!(true),
        "the list updated in place"
    );
    // Settled: the Start run's end is shown (no row is replaced under the click below).
    b.wait_text("#services", &format!("service-{service} #2 succeeded"));
    b.click(&format!("button[aria-label='Stop {service}']"));
    b.wait_text("#run-status", "succeeded");
    assert!(
        b.url().contains("/runs/"),
        "Stop leads to its run: {}",
        b.url()
    );
    assert_eq!(get_text(&url), None, "stopped");
    // Starting a stopped service is one tap from the dashboard.
    b.goto(&server.url("/"));
    b.wait_text("#dash-services", &service);
    b.click(&format!(
        "#dash-services button[aria-label='Start {service}']"
    ));
    b.wait_text("#run-status", "succeeded");
    crate::harness::eventually("the service answers again", || get_text(&url).is_some());
    // Removed behind skiff's back: the Services view says the engine has no such container.
    b.goto(&server.url("/services"));
    b.wait_text("#services", "running since");
    let removed = std::process::Command::new("docker")
        .args(["rm", "-f", &format!("{service}-1-1")])
        .output()
        .expect("docker rm");
    assert!(removed.status.success(), "{removed:?}");
    b.wait_text("#services", "the engine has no container");
    b.wait_text("#services", "missing");
}

/// Where `.ci/run` puts axe-core's `axe.min.js` (4.12.1, from PyPI's `axe-playwright-python`
/// 0.1.8 wheel); `SKIFF_AXE_JS` points elsewhere.
const AXE_DEFAULT: &str = "/var/cache/skiff-ci/axe.min.js";

fn axe_source() -> String {
    let path = std::env::var("SKIFF_AXE_JS").unwrap_or_else(|_| AXE_DEFAULT.to_string());
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "axe-core is missing at {path} ({e}); fetch it as .ci/run does:\n  \
             pip download --no-deps axe-playwright-python==0.1.8 -d /tmp/axe && \
             mkdir -p /var/cache/skiff-ci && \
             python3 -c \"import zipfile; open('{AXE_DEFAULT}', 'wb').write(zipfile.ZipFile('/tmp/axe/axe_playwright_python-0.1.8-py3-none-any.whl').read('axe_playwright_python/axe.min.js'))\""
        )
    })
}

impl Browser {
    /// A Chrome DevTools Protocol command through chromedriver's `goog/cdp/execute`.
    fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
    }

    /// axe-core's WCAG 2.0/2.1 A and AA violations on the current page, one line each.
    fn axe(&self, source: &str) -> Vec<String> {
        self.js(source);
        let result = self.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": r#"
const done = arguments[arguments.length - 1];
axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } })
  .then(r => done(r.violations.map(v => v.id + ': ' + v.help + ' at ' + v.nodes.slice(0, 4).map(n => n.target.join(' ') + ' (' + (n.failureSummary || '').replace(/\s+/g, ' ') + ')').join('; '))))
  .catch(e => done(['axe failed: ' + e]));
"#, "args": [] })),
        );
        result
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_else(|| vec![format!("axe returned {result}")])
    }
}

/// axe-core finds no WCAG 2.1 A/AA violation on the dashboard, a pipeline, a run with a fixed
/// coloured log, the runs page and settings, in the light and the dark scheme.
#[test]
fn axe_core_finds_no_violations_light_and_dark() {
    let axe = axe_source();
    let server = Server::start(&[
        (
            "colours",
            "description: Prints every ANSI colour\nparams:\n  target_env: { options: [staging, production], default: staging, description: Where to deploy }\n  dry_run: { type: boolean, default: false }\nsteps:\n  - name: Colours\n    run: |\n      for c in 30 31 32 33 34 35 36 37 90 91 92 93 94 95 96 97; do printf '\\033[%sm colour %s \\033[0m\\n' $c $c; done\n      printf '\\033[1;31mbold red\\033[0m \\033[38;5;27m256 blue\\033[0m \\033[38;2;200;30;30mtruecolor\\033[0m\\n'\n  - name: Fails\n    run: |\n      echo about to fail\n      exit 3\n",
        ),
        ("broken", "stpes: []\n"),
    ]);
    let id = server.trigger("colours", json!({}));
    server.follow(&id, None);
    let b = Browser::start();
    b.goto(&server.login_link);
    b.find("main");
    let pages = [
        ("/", "main"),
        ("/pipelines/colours", "#run-form"),
        (&*format!("/runs/{id}"), "#log .ln-row"),
        ("/runs", "#runs"),
        ("/settings", "#tokens"),
        ("/pipelines/broken", "main"),
    ];
    // Run and step statuses are live regions; the log is not.
    b.goto(&server.url(&format!("/runs/{id}")));
    b.find("#log .ln-row");
    let live = b.js("return [document.getElementById('run-status').getAttribute('aria-live'), Array.from(document.querySelectorAll('#steps .st')).map(e => e.getAttribute('aria-live') + ' ' + e.textContent), document.getElementById('log').closest('[aria-live]')];");
    assert_eq!(
        live,
        json!(["polite", ["polite succeeded", "polite failed"], null]),
        "statuses are announced, the log is not"
    );
    let skip = b.js("return document.querySelector('a.skip').getAttribute('href') + ' ' + !!document.getElementById('main');");
    assert_eq!(skip, json!("#main true"), "a skip link to the content");
    let mut found = Vec::new();
    for scheme in ["light", "dark"] {
        b.cdp(
            "Emulation.setEmulatedMedia",
            json!({ "features": [{ "name": "prefers-color-scheme", "value": scheme }] }),
        );
        for (path, ready) in pages {
            b.goto(&server.url(path));
            b.find(ready);
            let dark = b.js("return matchMedia('(prefers-color-scheme: dark)').matches;");
            assert_eq!(dark, json!(scheme == "dark"), "the emulated scheme holds");
            for v in b.axe(&axe) {
                found.push(format!("{scheme} {path}: {v}"));
            }
        }
    }
    assert!(found.is_empty(), "axe-core found:\n{}", found.join("\n"));
}

/// With JavaScript off, `/runs/{id}/log` shows the log rendered on the server, 2,000 lines a
/// page with colours and step headers; the raw log downloads as written.
#[test]
fn the_log_reads_without_javascript_in_pages_and_downloads_raw() {
    let server = Server::start(&[(
        "lines",
        "steps:\n  - name: Count\n    run: |\n      printf '\\033[31mred <b>\\033[0m\\n'\n      seq -f 'line %g' 2 4500\n",
    )]);
    let id = server.trigger("lines", json!({}));
    server.follow(&id, None);
    let b = Browser::start_with(json!({ "prefs": {
        "profile.managed_default_content_settings.javascript": 2 } }));
    b.goto(&server.login_link);
    b.find("main");
    b.goto(&server.url(&format!("/runs/{id}")));
    b.click("#plain-log");
    b.wait_text("#log-summary", "4500 lines · page 1 of 3");
    assert_eq!(
        b.js("return 1;"),
        json!(1),
        "WebDriver's own scripts still run"
    );
    let page1 = b.js("return [document.querySelectorAll('#log .ln-row').length, document.querySelector('#log .step-head').textContent, document.querySelector('#L1 .f1') && document.querySelector('#L1 .f1').textContent, !!document.querySelector('#L1 b')];");
    assert_eq!(
        page1,
        json!([2000, "▸ Count succeeded", "red <b>", false]),
        "a page of 2,000 lines, coloured and escaped"
    );
    b.click("a[rel=next]");
    b.click("a[rel=next]");
    b.wait_text("#log-summary", "page 3 of 3");
    let page3 = b.js("return [document.querySelectorAll('#log .ln-row').length, document.querySelector('#log .ln-row').id, document.getElementById('L4500').textContent];");
    assert_eq!(page3, json!([500, "L4001", "4500line 4500"]));
    let sideways = b.js(SIDEWAYS);
    assert_eq!(sideways[0], sideways[1], "no sideways scroll: {sideways}");

    // The browser's session (the one-time link is spent).
    let cookie = b
        .cmd("GET", "/cookie", None)
        .as_array()
        .and_then(|all| all.first().cloned())
        .map(|c| {
            format!(
                "{}={}",
                c["name"].as_str().unwrap_or(""),
                c["value"].as_str().unwrap_or("")
            )
        })
        .expect("a session cookie");
    let (status, headers, body) = crate::harness::raw(
        "GET",
        &server.url(&format!("/runs/{id}/log.txt")),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!(status, 200);
    assert!(
        headers.iter().any(|(k, v)| k == "content-disposition"
            && v.contains("attachment")
            && v.contains("lines-1.log")),
        "{headers:?}"
    );
    assert!(
        body.starts_with("\x1b[31mred <b>\x1b[0m\nline 2\n") && body.ends_with("line 4500\n"),
        "the raw log as written: {:?}",
        &body[..40.min(body.len())]
    );
    let (status, _, page) = crate::harness::raw(
        "GET",
        &server.url(&format!("/runs/{id}/log?page=4")),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!(status, 404);
    assert!(page.contains("3 pages of 2000 lines, not 4"), "{page}");
    let (status, _, page) = crate::harness::raw(
        "GET",
        &server.url(&format!("/runs/{id}/log?page=x")),
        None,
        &[("cookie", &cookie)],
    );
    assert_eq!(status, 400);
    assert!(page.contains("page must be a number from 1"), "{page}");
}

/// A run's context: Rerun repeats it exactly; "Run again with changes..." opens the pipeline's
/// form prefilled from it and the new run says which run it repeats; outputs, readable params
/// and the previous/next run are on the page.
#[test]
fn run_again_with_changes_prefills_the_form_and_records_the_rerun() {
    let server = Server::start(&[(
        "deploy",
        "params:\n  target_env: { options: [staging, production], default: staging }\n  who: { default: world }\nsteps:\n  - id: greet\n    name: Greet\n    run: |\n      echo \"hello $SKIFF_PARAM_WHO\"\n      echo \"message=hi $SKIFF_PARAM_WHO\" >> \"$SKIFF_OUTPUT\"\n",
    )]);
    let first = server.trigger("deploy", json!({ "who": "first" }));
    server.follow(&first, None);
    let second = server.trigger(
        "deploy",
        json!({ "who": "second", "target_env": "production" }),
    );
    server.follow(&second, None);
    let b = Browser::start();
    b.goto(&server.login_link);
    b.find("main");
    b.goto(&server.url(&format!("/runs/{second}")));
    b.wait_text("#run-status", "succeeded");
    assert_eq!(b.text("#params"), "Target env\nproduction\nWho\nsecond");
    b.wait_text("#step-0 .outputs", "message");
    b.wait_text("#step-0 .outputs", "hi second");
    assert_eq!(b.text("#prev-run"), "← #1");
    assert_eq!(
        b.js("return document.getElementById('next-run');"),
        json!(null),
        "the newest run has no next"
    );
    b.click("#run-again");
    b.wait_text("#prefilled", "Prefilled from #2");
    let values = b.js("return [document.querySelector(\"[name='param.who']\").value, document.querySelector(\"[name='param.target_env']\").value];");
    assert_eq!(values, json!(["second", "production"]));
    b.type_into("input[name='param.who']", "changed");
    b.click("#run-form button[type=submit]");
    b.wait_text("#run-status", "succeeded");
    b.wait_text(".run-meta", "rerun of #2");
    b.wait_text("#params", "changed");
    let id = b.url().rsplit('/').next().unwrap_or("").to_string();
    let (_, run) = server.api("GET", &format!("/api/runs/{id}"), None);
    assert_eq!(run["rerun_of"], json!(second), "{run}");
    assert_eq!(run["number"], json!(3), "{run}");
    b.wait_text("#prev-run", "#2");
    b.click("#prev-run");
    b.wait_text("#next-run", "#3");
    // A run of another pipeline cannot prefill this one; an unknown run is a 404.
    b.goto(&server.url("/pipelines/deploy?from=nope"));
    b.find("[data-status]");
    let status = b.js("return document.querySelector('[data-status]').dataset.status;");
    assert_eq!(status, json!("404"));
}

/// skiff installs on a phone's home screen: Chromium finds no installability error (its
/// manifest, icons and start URL; 127.0.0.1 is a secure context), and the icons are served.
#[test]
fn the_ui_is_installable() {
    let server = Server::start(&[("hello", "steps:\n  - run: \"true\"\n")]);
    let b = Browser::phone(390);
    b.goto(&server.login_link);
    b.find("main");
    let manifest = b.js("return document.querySelector('link[rel=manifest]').href;");
    assert_eq!(
        manifest,
        json!(server.url("/static/manifest.webmanifest")),
        "the pages link the manifest"
    );
    let until = Instant::now() + WAIT;
    loop {
        let errors = b.cdp("Page.getInstallabilityErrors", json!({}));
        let list = errors["installabilityErrors"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if list.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "Chromium says it cannot install: {errors}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let manifest = b.cdp("Page.getAppManifest", json!({}));
    assert!(
        manifest["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/static/manifest.webmanifest"))
            && manifest["data"]
                .as_str()
                .is_some_and(|d| d.contains("standalone")),
        "Chromium read the manifest: {manifest}"
    );
    assert!(
        manifest["errors"].as_array().is_some_and(Vec::is_empty),
        "the manifest parses cleanly: {manifest}"
    );
    // The icons are public PNGs of the sizes the manifest says.
    for (path, size) in [("/static/icon-192.png", 192), ("/static/icon-512.png", 512)] {
        let probe = format!(
            "const done = arguments[0]; const i = new Image(); i.onload = () => done([i.naturalWidth, i.naturalHeight]); i.onerror = () => done('failed'); i.src = '{path}';"
        );
        let got = b.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": probe, "args": [] })),
        );
        assert_eq!(got, json!([size, size]), "{path}");
    }
}

/// Small things: a description's Markdown is rendered (safely), params are labelled in words,
/// an invalid pipeline counts its problems in words and lists each with its place and source
/// line, and no page shows where the server keeps its files.
#[test]
fn descriptions_render_markdown_and_problems_are_counted_in_words() {
    let server = Server::start(&[
        (
            "docs",
            "description: \"Deploys `main` to **prod** <b>now</b>; see [the docs](https://example.org/x)\"\nparams:\n  target_env: { default: staging, description: \"Where, as in `kubectl config get-contexts`\" }\nsteps:\n  - run: \"true\"\n",
        ),
        ("one-bad", "stpes: []\n"),
        (
            "two-bad",
            "steps:\n  - run: \"true\"\n    timeout: soon\n    retyr: 2\n",
        ),
    ]);
    let b = Browser::start();
    b.goto(&server.login_link);
    b.find("main");
    b.goto(&server.url("/pipelines/docs"));
    let rendered = b.js("const d = document.getElementById('description'); return [d.querySelector('code').textContent, d.querySelector('strong').textContent, d.querySelector('a').href, !!d.querySelector('b'), d.textContent.includes('<b>now</b>')];");
    assert_eq!(
        rendered,
        json!(["main", "prod", "https://example.org/x", false, true]),
        "Markdown rendered, HTML in it shown as text"
    );
    let label = b.js("return document.querySelector(\"input[name='param.target_env']\").closest('label').firstChild.textContent.trim();");
    assert_eq!(label, json!("Target env"));
    b.wait_text("#run-form small code", "kubectl config get-contexts");
    let dir = server.pipelines_dir().display().to_string();
    for (path, count) in [
        ("/pipelines/one-bad", "1 problem"),
        ("/pipelines/two-bad", "2 problems"),
    ] {
        b.goto(&server.url(path));
        b.wait_text("main h2", &format!("This pipeline is invalid: {count}"));
        let items = b.js("return Array.from(document.querySelectorAll('#diagnostics li .where')).map(e => e.textContent);");
        assert!(
            items.as_array().is_some_and(|a| !a.is_empty()
                && a.iter()
                    .all(|w| w.as_str().is_some_and(|w| w.starts_with("Line ")))),
            "{items}"
        );
        let text = b.text("main");
        assert!(
            !text.contains(&dir),
            "the server's path shows on {path}: {text}"
        );
        assert!(!text.contains("problem(s)"), "{text}");
    }
    b.goto(&server.url("/"));
    b.wait_text("main", "Invalid: 1 problem.");
    b.wait_text("main", "Invalid: 2 problems.");
}

impl Browser {
    /// The browser's session cookie, for requests made beside it.
    fn session_cookie(&self) -> String {
        self.cmd("GET", "/cookie", None)
            .as_array()
            .and_then(|all| all.first().cloned())
            .map(|c| {
                format!(
                    "{}={}",
                    c["name"].as_str().unwrap_or(""),
                    c["value"].as_str().unwrap_or("")
                )
            })
            .expect("a session cookie")
    }

    /// Sends keys to the element (WebDriver key codes: \u{E007} is Enter, \u{E008} Shift).
    fn keys(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Runs `script` until it returns `want`; panics with what it last returned.
    fn wait_js(&self, script: &str, want: Value) {
        let until = Instant::now() + WAIT;
        loop {
            let got = self.js(script);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < until,
                "`{script}` returned {got}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The pipeline of the log viewer's tests: a long succeeded step, then a step with progress
/// redrawn with carriage returns, a long line, text to search for, and a failure.
const LOG_VIEWER: &str = "steps:\n  - name: Build\n    run: seq -f 'build line %g' 1 800\n  - name: Test\n    run: |\n      echo downloading\n      printf '10%%\\r20%%\\r30%%\\n'\n      printf 'y%.0s' $(seq 1 600); echo\n      echo 'a needle here'\n      echo '<i>needle</i> and NEEDLE'\n      seq -f 'test line %g' 1 60\n      echo failing now\n      exit 1\n";

/// A server with the log viewer's pipeline run to its end, and a signed-in browser on its run
/// page once the whole log is in.
fn open_log_viewer() -> (Server, String, Browser) {
    let server = Server::start(&[("viewer", LOG_VIEWER)]);
    let id = server.trigger("viewer", json!({}));
    server.follow(&id, None);
    let b = Browser::start();
    b.goto(&server.login_link);
    b.find("main");
    b.goto(&server.url(&format!("/runs/{id}")));
    b.wait_text("#log-state", "run failed");
    (server, id, b)
}

/// A failed run opens at its failed step, whose header is red; the long succeeded step starts
/// folded; headers fold by click and by keyboard; `\r` progress shows its last state while the
/// raw log keeps the bytes.
#[test]
fn a_failed_run_opens_at_its_failed_step_and_steps_fold() {
    let (server, id, b) = open_log_viewer();
    let at = b.js("const h = document.getElementById('L-step-1'); const r = h.getBoundingClientRect(); const head = document.getElementById('run-head').getBoundingClientRect(); return [window.scrollY > 0, r.top >= head.bottom - 1 && r.bottom <= window.innerHeight, h.parentNode.className, getComputedStyle(h).color, h.textContent.includes('failed')];");
    assert_eq!(
        at,
        json!([true, true, "sec failed", "rgb(255, 123, 114)", true]),
        "the page opens at the failed step, its header red and saying so"
    );
    let folded = "return ['L-step-0', 'L-step-1'].map(id => document.getElementById(id).getAttribute('aria-expanded')).concat([document.getElementById('L200').offsetParent !== null]);";
    assert_eq!(
        b.js(folded),
        json!(["false", "true", false]),
        "the long succeeded step starts folded, the failed one open"
    );
    // Below the sticky head (WebDriver scrolls a target only as far as the window's edge).
    b.js("document.getElementById('L-step-0').scrollIntoView({ block: 'center' });");
    b.click("#L-step-0");
    assert_eq!(
        b.js(folded),
        json!(["true", "true", true]),
        "a click unfolds"
    );
    b.js("document.getElementById('L-step-0').scrollIntoView({ block: 'center' });");
    b.click("#L-step-0");
    assert_eq!(b.js(folded), json!(["false", "true", false]), "and folds");
    b.js("document.getElementById('L-step-1').scrollIntoView({ block: 'center' });");
    b.keys("#L-step-1", "\u{E007}");
    assert_eq!(
        b.js(folded),
        json!(["false", "false", false]),
        "Enter on a header folds it"
    );
    b.keys("#L-step-1", " ");
    assert_eq!(
        b.js(folded),
        json!(["false", "true", false]),
        "Space unfolds it"
    );
    let focus = b.js("return document.activeElement.id;");
    assert_eq!(focus, json!("L-step-1"), "the header keeps the focus");

    // Progress redrawn with `\r` shows its last state; the raw log keeps every byte.
    let progress = b.js("const rows = Array.from(document.querySelectorAll('#log .ln-row')); const i = rows.findIndex(r => r.lastChild.textContent === 'downloading'); return [rows[i + 1].lastChild.textContent, document.getElementById('log').textContent.includes('10%')];");
    assert_eq!(
        progress,
        json!(["30%", false]),
        "a line with carriage returns shows its last state"
    );
    let (status, _, raw) = crate::harness::raw(
        "GET",
        &server.url(&format!("/runs/{id}/log.txt")),
        None,
        &[("cookie", &b.session_cookie())],
    );
    assert_eq!(status, 200);
    assert!(
        raw.contains("downloading\n10%\r20%\r30%\n"),
        "the raw log keeps the carriage returns"
    );
    // The script-free page shows the last state too.
    b.goto(&server.url(&format!("/runs/{id}/log")));
    let plain = b.js("return Array.from(document.querySelectorAll('#log .ln-row')).some(r => r.lastChild.textContent === '30%');");
    assert_eq!(
        plain,
        json!(true),
        "the page without script collapses `\\r`"
    );
    let failed_head = b.js("const h = document.querySelector('#log .failed > .step-head'); return h && [h.textContent, getComputedStyle(h).color];");
    assert!(
        failed_head[0]
            .as_str()
            .is_some_and(|t| t.ends_with("failed"))
            && failed_head[1] == "rgb(255, 123, 114)",
        "the page without script shows the failed step's header, in red: {failed_head}"
    );

    // A link to a step opens there, unfolded.
    b.goto(&server.url(&format!("/runs/{id}#L-step-0")));
    b.wait_text("#log-state", "run failed");
    assert_eq!(
        b.js("return document.getElementById('L-step-0').getAttribute('aria-expanded');"),
        json!("true"),
        "a step linked to opens unfolded"
    );
    b.screenshot("log-viewer-failed.png");
}

/// Search finds every match (case-insensitive), counts them, moves with Enter and Shift+Enter
/// and unfolds the step a match is in; per-line times and wrapping are toggles remembered
/// across reloads; log text stays text.
#[test]
fn the_log_searches_shows_times_and_wraps_on_demand() {
    let (_server, _id, b) = open_log_viewer();
    assert_eq!(
        b.js("return document.querySelector('#log i');"),
        Value::Null,
        "log text is never markup"
    );

    b.type_into("#find", "needle");
    b.wait_text("#found", "1 of 3");
    let current = "const r = document.querySelector('#log .ln-row.found'); return r ? r.lastChild.textContent : null;";
    assert_eq!(b.js(current), json!("a needle here"));
    let painted = b.js(
        "return [CSS.highlights.get('find').size, CSS.highlights.get('find-cur').size, CSS.highlights.get('find-cur').values().next().value.toString()];",
    );
    assert_eq!(painted, json!([3, 1, "needle"]), "matches are highlighted");
    b.keys("#find", "\u{E007}");
    b.wait_text("#found", "2 of 3");
    assert_eq!(b.js(current), json!("<i>needle</i> and NEEDLE"));
    b.keys("#find", "\u{E007}");
    b.wait_text("#found", "3 of 3");
    b.keys("#find", "\u{E008}\u{E007}\u{E008}");
    b.wait_text("#found", "2 of 3");
    b.click("#find-next");
    b.click("#find-next");
    b.wait_text("#found", "1 of 3");
    // A match in a folded step unfolds it and comes into view.
    b.type_into("#find", "build line 321");
    b.wait_text("#found", "1 of 1");
    let shown = b.js("const r = document.getElementById('L321'); const b = r.getBoundingClientRect(); return [document.getElementById('L-step-0').getAttribute('aria-expanded'), r.classList.contains('found'), b.top >= 0 && b.bottom <= window.innerHeight];");
    assert_eq!(shown, json!(["true", true, true]));
    b.type_into("#find", "no such text");
    b.wait_text("#found", "no match");

    // Times: hidden, then shown beside every line, remembered.
    let time = "return [document.getElementById('times').getAttribute('aria-pressed'), getComputedStyle(document.getElementById('L1'), '::before').content];";
    let off = b.js(time);
    assert_eq!(off[0], json!("false"));
    assert!(
        off[1] == json!("none") || off[1] == json!("normal"),
        "no times by default: {off}"
    );
    b.click("#times");
    let on = b.js(time);
    let shown = on[1].as_str().unwrap_or("").to_string();
    assert!(
        on[0] == json!("true")
            && shown.len() == 10
            && shown[1..9].chars().filter(|c| c.is_ascii_digit()).count() == 6,
        "each line shows the time it was read: {on}"
    );
    b.goto(&b.url());
    b.wait_text("#log-state", "run failed");
    assert_eq!(b.js(time)[0], json!("true"), "remembered across a reload");
    b.click("#times");
    assert_eq!(b.js(time)[0], json!("false"));

    // Wrapping: on by default; off, the long line scrolls sideways; remembered.
    let wrap = "const log = document.getElementById('log'); const row = Array.from(log.querySelectorAll('.ln-row')).find(r => r.lastChild.textContent.startsWith('yyyy')); const line = parseFloat(getComputedStyle(row).lineHeight); return [document.getElementById('wrap').getAttribute('aria-pressed'), row.getBoundingClientRect().height > 1.5 * line, log.scrollWidth > log.clientWidth];";
    assert_eq!(b.js(wrap), json!(["true", true, false]), "long lines wrap");
    b.click("#wrap");
    assert_eq!(
        b.js(wrap),
        json!(["false", false, true]),
        "unwrapped, a long line scrolls sideways"
    );
    b.goto(&b.url());
    b.wait_text("#log-state", "run failed");
    b.wait_js(
        "const w = document.getElementById('wrap'); return w.getAttribute('aria-pressed') + ' ' + document.getElementById('log').classList.contains('nowrap');",
        json!("false true"),
    );
    let sideways = b.js(SIDEWAYS);
    assert_eq!(
        sideways[0], sideways[1],
        "the page itself does not scroll sideways: {sideways}"
    );
    b.screenshot("log-viewer-nowrap.png");
}
