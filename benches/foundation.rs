//! The foundation benchmark: per-step overhead, log throughput and memory, validation speed.
//! Run with `cargo bench --bench foundation`; it prints its figures and the targets.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `--rss-probe CMD...`: run CMD, print the peak RSS (KiB) of its process tree's largest member.
    if args.get(1).map(String::as_str) == Some("--rss-probe") {
        let status = Command::new(&args[2])
            .args(&args[3..])
            .stdout(Stdio::null())
            .status()
            .expect("run probe");
        let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
            .expect("getrusage");
        println!("{} {}", usage.max_rss(), status.success());
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let dir = tempfile::tempdir().expect("tempdir");
    println!("skiff foundation benchmark ({})", SKIFF);
    if wanted("steps") {
        per_step(dir.path());
    }
    if wanted("logs") {
        log_throughput(dir.path());
    }
    if wanted("validate") {
        validate(dir.path());
    }
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn skiff_run(dir: &Path, file: &Path) -> Duration {
    let start = Instant::now();
    let status = Command::new(SKIFF)
        .args(["run", file.to_str().expect("path"), "--color", "never"])
        .env("SKIFF_DATA", dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("skiff run");
    let took = start.elapsed();
    assert!(status.success(), "skiff run {} failed", file.display());
    took
}

fn per_step(dir: &Path) {
    const STEPS: usize = 200;
    const REPS: usize = 7;
    let many = dir.join("steps-200.yml");
    let one = dir.join("steps-1.yml");
    let mut yaml = String::from("steps:\n");
    for _ in 0..STEPS {
        yaml.push_str("  - run: \"true\"\n");
    }
    std::fs::write(&many, yaml).expect("write");
    std::fs::write(&one, "steps:\n  - run: \"true\"\n").expect("write");
    skiff_run(dir, &one); // warm up the store file and page cache
    let t_many = median((0..REPS).map(|_| skiff_run(dir, &many)).collect());
    let t_one = median((0..REPS).map(|_| skiff_run(dir, &one)).collect());
    let per_step = (t_many.saturating_sub(t_one)) / (STEPS as u32 - 1);

    let bare = median(
        (0..REPS)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..STEPS {
                    Command::new("true").status().expect("true");
                }
                start.elapsed() / STEPS as u32
            })
            .collect(),
    );
    let overhead = per_step.saturating_sub(bare);
    println!("\n[steps] a pipeline of {STEPS} `run: \"true\"` steps (median of {REPS})");
    println!("  skiff run, {STEPS} steps:      {:>9.1} ms", ms(t_many));
    println!("  skiff run, 1 step:          {:>9.1} ms", ms(t_one));
    println!("  time per step:              {:>9.3} ms", ms(per_step));
    println!("  bare fork/exec of `true`:   {:>9.3} ms", ms(bare));
    println!(
        "  overhead per step:          {:>9.3} ms   (target < 2 ms) {}",
        ms(overhead),
        verdict(overhead < Duration::from_millis(2))
    );
}

fn log_throughput(dir: &Path) {
    const REPS: usize = 3;
    let command = "seq -f '%059g' 1 1000000";
    let file = dir.join("logs.yml");
    std::fs::write(&file, format!("steps:\n  - run: \"{command}\"\n")).expect("write");
    let bytes = 1_000_000u64 * 60;
    let baseline = median(
        (0..REPS)
            .map(|_| {
                let start = Instant::now();
                let ok = Command::new("bash")
                    .args(["-c", &format!("{command} > /dev/null")])
                    .status()
                    .expect("bash");
                assert!(ok.success());
                start.elapsed()
            })
            .collect(),
    );
    let skiff = median((0..REPS).map(|_| skiff_run(dir, &file)).collect());
    let probe = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--rss-probe",
            SKIFF,
            "run",
            file.to_str().expect("path"),
            "--color",
            "never",
        ])
        .env("SKIFF_DATA", dir.join("data"))
        .output()
        .expect("rss probe");
    let text = String::from_utf8_lossy(&probe.stdout);
    let rss_kib: u64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let ratio = skiff.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "\n[logs] one step printing 1,000,000 lines ({} MB), median of {REPS}",
        bytes / 1_000_000
    );
    println!("  to /dev/null:               {:>9.1} ms", ms(baseline));
    println!(
        "  under skiff run (stored):   {:>9.1} ms   ({:.0} MB/s)",
        ms(skiff),
        bytes as f64 / skiff.as_secs_f64() / 1e6
    );
    println!(
        "  ratio:                      {:>9.2} x    (target <= 1.5x) {}",
        ratio,
        verdict(ratio <= 1.5)
    );
    println!(
        "  peak RSS of the runner:     {:>9.1} MB   (target < 40 MB) {}",
        rss_kib as f64 / 1024.0,
        verdict(rss_kib < 40 * 1024)
    );
}

fn validate(dir: &Path) {
    const FILES: usize = 1000;
    const REPS: usize = 5;
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).expect("mkdir");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/hello.yml"))
            .expect("hello.yml");
    for i in 0..FILES {
        let text = example.replacen("name: hello", &format!("name: hello-{i}"), 1);
        std::fs::write(corpus.join(format!("p{i:04}.yml")), text).expect("write");
    }
    let took = median(
        (0..REPS)
            .map(|_| {
                let start = Instant::now();
                let ok = Command::new(SKIFF)
                    .args(["validate", "--quiet", corpus.to_str().expect("path")])
                    .stdout(Stdio::null())
                    .status()
                    .expect("validate");
                assert!(ok.success());
                start.elapsed()
            })
            .collect(),
    );
    let lines = example.lines().count();
    println!("\n[validate] {FILES} pipelines of {lines} lines each (median of {REPS})");
    println!(
        "  skiff validate:             {:>9.1} ms   (target < 1000 ms) {}",
        ms(took),
        verdict(took < Duration::from_secs(1))
    );

    // Hostile files: 40,000 keys in one mapping (duplicate keys are looked up in a hash set),
    // and 264 KB that aliases would expand to 500 MB (refused by the budget of expanded text).
    let keys = dir.join("keys.yml");
    let mut text = String::from("env:\n");
    for i in 0..40_000 {
        text.push_str(&format!("  K{i}: x\n"));
    }
    text.push_str("steps:\n  - run: echo\n");
    std::fs::write(&keys, text).expect("write");
    let bomb = dir.join("bomb.yml");
    let mut text = format!("big: &big \"{}\"\nlist:\n", "x".repeat(250 << 10));
    for _ in 0..2000 {
        text.push_str("  - *big\n");
    }
    text.push_str("steps:\n  - run: echo\n");
    std::fs::write(&bomb, text).expect("write");
    let validate_one = |file: &Path, ok: bool| {
        median(
            (0..REPS)
                .map(|_| {
                    let start = Instant::now();
                    let status = Command::new(SKIFF)
                        .args(["validate", "--quiet", file.to_str().expect("path")])
                        .stdout(Stdio::null())
                        .status()
                        .expect("validate");
                    assert_eq!(status.success(), ok, "{}", file.display());
                    start.elapsed()
                })
                .collect(),
        )
    };
    let keys_took = validate_one(&keys, true);
    let bomb_took = validate_one(&bomb, false);
    let probe = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--rss-probe",
            SKIFF,
            "validate",
            bomb.to_str().expect("path"),
        ])
        .output()
        .expect("rss probe");
    let bomb_rss_kib: u64 = String::from_utf8_lossy(&probe.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    println!(
        "  one mapping of 40,000 keys: {:>9.1} ms   (target < 500 ms) {}",
        ms(keys_took),
        verdict(keys_took < Duration::from_millis(500))
    );
    println!(
        "  alias bomb of text, refused:{:>9.1} ms   (target < 100 ms) {}",
        ms(bomb_took),
        verdict(bomb_took < Duration::from_millis(100))
    );
    println!(
        "  its peak RSS:               {:>9.1} MB   (target < 20 MB) {}",
        bomb_rss_kib as f64 / 1024.0,
        verdict(bomb_rss_kib < 20 * 1024)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}
