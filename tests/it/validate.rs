//! `skiff validate` and the CLI's help.

use crate::harness::Sandbox;

#[test]
fn every_example_pipeline_is_valid() {
    let sb = Sandbox::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = repo.join("pipelines");
    // The repository's skiff.toml declares the registry the build-push-deploy example uses.
    let config = repo.join("skiff.toml");
    let out = sb.run(&[
        "validate",
        "--config",
        config.to_str().expect("path"),
        dir.to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let count = std::fs::read_dir(&dir).expect("pipelines").count();
    assert!(count >= 2);
    assert!(
        out.stdout.contains(&format!("{count} files valid")),
        "{}",
        out.stdout
    );
    // Without a config that declares it, the registry is an error at its line and column.
    let out = sb.run(&["validate", dir.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout.contains("build-push-deploy.yml:26:17: error: registry `local` is not declared in skiff's config (declared: none: see [[registry]] in skiff.toml)"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_corpus_of_broken_files_reports_each_problem_at_its_place() {
    let sb = Sandbox::new();
    let dir = sb.path().join("broken");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("a.yml"), "name: a\nstpes:\n  - run: echo\n").expect("write");
    std::fs::write(
        dir.join("b.yaml"),
        "steps:\n  - run: echo\n    timeout: 10\n  - uses: docker/nope\n",
    )
    .expect("write");
    std::fs::write(dir.join("c.yml"), "steps:\n  - run: echo ${{ params.x }}\n").expect("write");
    std::fs::write(dir.join("good.yml"), "steps:\n  - run: echo ok\n").expect("write");
    std::fs::write(dir.join("d.yml"), [0xff, 0xfe, b'\n']).expect("write");
    std::fs::write(dir.join("notes.txt"), "not a pipeline").expect("write");
    let out = sb.run(&["validate", dir.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    let d = dir.display();
    for expected in [
        format!("{d}/a.yml:2:1: error: unknown key `stpes` in the pipeline"),
        "help: did you mean `steps`?".to_string(),
        format!("{d}/b.yaml:3:14: error: `timeout`: `10` has no unit"),
        format!("{d}/b.yaml:4:11: error: unknown action `docker/nope`"),
        format!("{d}/c.yml:2:15: error: `${{{{ ... }}}}` is not expanded inside `run:`"),
        "help: use the environment variable instead: \"$SKIFF_PARAM_X\"".to_string(),
        format!("{d}/d.yml:1:1: error: the file is not valid UTF-8"),
        format!("{d}/good.yml: ok"),
        "4 of 5 files invalid, 5 problems".to_string(),
    ] {
        assert!(
            out.stdout.contains(&expected),
            "missing {expected:?} in:\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains("notes.txt"));
}

#[test]
fn quiet_validation_prints_nothing_for_valid_files() {
    let sb = Sandbox::new();
    let dir = sb.path().join("many");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..50 {
        std::fs::write(dir.join(format!("p{i}.yml")), "steps:\n  - run: echo ok\n").expect("write");
    }
    let out = sb.run(&["validate", "--quiet", dir.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(out.stdout, "", "--quiet prints nothing for valid files");
}

#[test]
fn missing_path_is_a_clear_error() {
    let sb = Sandbox::new();
    let out = sb.run(&["validate", "no/such/dir"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("no/such/dir does not exist"),
        "{}",
        out.stderr
    );
}

#[test]
fn help_is_complete() {
    let sb = Sandbox::new();
    for sub in [
        "run",
        "validate",
        "serve",
        "worker",
        "trigger",
        "login-link",
        "token",
    ] {
        let mut cmd = sb.skiff(&[sub, "--help"]);
        cmd.env_remove("SKIFF_DATA")
            .env_remove("SKIFF_KILL_GRACE")
            .env_remove("SKIFF_WORKSPACES");
        let out = crate::harness::run_to_end(cmd);
        assert_eq!(out.code, Some(0));
        insta::assert_snapshot!(format!("help_{sub}"), out.stdout);
    }
    let out = sb.run(&["--help"]);
    insta::assert_snapshot!("help", out.stdout);
}

#[test]
fn the_readme_commands_are_real() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    let test_command = "cargo test --workspace --locked";
    assert!(
        readme.contains("cargo run --release -- serve"),
        "the README starts skiff on its embedded default"
    );
    assert!(
        readme.contains(test_command) && ci.contains(test_command),
        "CI runs the README's test command"
    );
    let sb = Sandbox::new();
    let out = sb.run(&["serve", "--help"]);
    assert_eq!(out.code, Some(0));
    for var in [
        "SKIFF_LISTEN",
        "SKIFF_PIPELINES",
        "SKIFF_WORKERS",
        "SKIFF_DATA",
        "SKIFF_ADMIN_TOKEN",
        "SKIFF_PUBLIC_URL",
        "SKIFF_RELOAD_EVERY",
    ] {
        assert!(out.stdout.contains(var), "serve --help names {var}");
        assert!(readme.contains(var), "the README documents {var}");
    }
}

#[test]
fn only_regular_files_are_read() {
    let sb = Sandbox::new();
    let fifo = sb.path().join("fifo.yml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let limit = skiff_core::yaml::Limits::default().max_bytes;
    let big = sb.path().join("big.yml");
    std::fs::write(&big, vec![b'#'; limit + 1]).expect("write");
    for (path, expected) in [
        (
            "/dev/zero".to_string(),
            "/dev/zero:1:1: error: not a regular file (a character device); a pipeline is read from a regular file".to_string(),
        ),
        (
            fifo.display().to_string(),
            format!("{}:1:1: error: not a regular file (a FIFO)", fifo.display()),
        ),
        (
            big.display().to_string(),
            format!(
                "{}:1:1: error: the file is {} bytes, more than the limit of {limit} bytes",
                big.display(),
                limit + 1
            ),
        ),
    ] {
        // A read that never ends (a FIFO, /dev/zero) would hit the harness's deadline.
        let out = sb.run(&["validate", &path]);
        assert_eq!(out.code, Some(1), "{path}: {}", out.all());
        assert!(out.stdout.contains(&expected), "{path}: {}", out.all());
        // One problem is counted as one, not as "1 problems".
        assert!(
            out.stdout.contains("1 of 1 files invalid, 1 problem\n"),
            "{path}: {}",
            out.all()
        );
    }
    // In a folder, a FIFO named like a pipeline is reported, not skipped and not waited on.
    let out = sb.run(&["validate", sb.path().to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout
            .contains("fifo.yml:1:1: error: not a regular file (a FIFO)")
            && out.stdout.contains("2 of 2 files invalid"),
        "{}",
        out.all()
    );
}

/// 264 KB on disk, 500 MB once its aliases are expanded: refused before the copies are made.
#[test]
fn an_alias_bomb_of_text_is_refused() {
    let sb = Sandbox::new();
    let mut src = format!("big: &big \"{}\"\nlist:\n", "x".repeat(250 << 10));
    for _ in 0..2000 {
        src.push_str("  - *big\n");
    }
    src.push_str("steps:\n  - run: echo\n");
    let file = sb.pipeline("bomb", &src);
    let out = sb.run(&["validate", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout.contains(
            "bomb.yml:18:5: error: document expands to more than 4 MiB of text through aliases"
        ),
        "{}",
        out.all()
    );
}

#[test]
fn steps_are_checked_at_load_not_at_run() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "strict",
        "on: yes\nsteps:\n  - run: echo\n    if: 42\n    working_directory: /etc\n  - uses: http/wait\n    with: { url: \"file:///etc/passwd\", status: 70000 }\n",
    );
    let out = sb.run(&["validate", file.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    let f = file.display();
    for expected in [
        format!("{f}:1:5: error: `on` must be a mapping of triggers, found `yes`"),
        format!("{f}:4:9: error: `if` must be a condition, found the number `42`"),
        format!("{f}:5:24: error: `working_directory` must be inside the run's workspace"),
        format!("{f}:7:18: error: `with.url`: `file:///etc/passwd` is not an http:// URL"),
        format!("{f}:7:48: error: `with.status`: `70000` is not an HTTP status"),
        "1 of 1 files invalid, 5 problems".to_string(),
    ] {
        assert!(
            out.stdout.contains(&expected),
            "missing {expected:?} in:\n{}",
            out.stdout
        );
    }
    // `skiff run` refuses the file the same way, before any step starts.
    let out = sb.run(&["run", file.to_str().expect("path")]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("`if` must be a condition"),
        "{}",
        out.all()
    );
}

#[test]
fn working_directory_is_a_folder_of_the_workspace() {
    let sb = Sandbox::new();
    let file = sb.pipeline(
        "wd",
        "steps:\n  - run: mkdir -p sub/dir\n  - run: echo \"in=$(pwd)\"\n    working_directory: sub/dir\n",
    );
    let out = sb.run(&["run", file.to_str().expect("path"), "--color", "never"]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let line = out
        .all()
        .lines()
        .find(|l| l.contains("in=/"))
        .map(str::to_string);
    assert!(
        line.as_deref().is_some_and(|l| l.ends_with("/sub/dir")),
        "{}",
        out.all()
    );
}

/// What only shows across files: two pipelines sharing a hook with different secrets. The
/// second by name is at fault, at its `secret:`.
#[test]
fn pipelines_sharing_a_hook_must_name_one_secret_in_validate_too() {
    let sb = Sandbox::new();
    sb.pipeline(
        "a-build",
        "on:\n  webhook: { hook: repo, secret: \"${{ secrets.ONE }}\" }\nsteps:\n  - run: \"true\"\n",
    );
    sb.pipeline(
        "b-test",
        "on:\n  webhook:\n    hook: repo\n    secret: \"${{ secrets.TWO }}\"\nsteps:\n  - run: \"true\"\n",
    );
    let a = sb.path().join("a-build.yml");
    let b = sb.path().join("b-test.yml");
    let out = sb.run(&[
        "validate",
        a.to_str().expect("path"),
        b.to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout.contains("b-test.yml:4:13: error: hook `repo` is shared with pipeline `a-build`, which checks it with secret `ONE`, not `TWO`"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("a-build.yml: ok"), "{}", out.stdout);
}
