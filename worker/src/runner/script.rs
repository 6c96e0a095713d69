//! `run:` steps: the shell, the step files (a long script, `$SKIFF_OUTPUT`: made where no step
//! can write, read back only as a regular file of the step's own), one attempt of a script.

use super::*;

/// Scripts up to this size are given to the shell as its `-c` argument; longer ones go through a
/// file (an argument may not exceed 128 KiB).
const INLINE_SCRIPT_MAX: usize = 64 << 10;

/// After skiff died during a run: ends the processes the run left behind (by its cgroup, then by
/// the `SKIFF_RUN_ID` every step's processes carry) and removes its step files. The workspace stays
/// for the run's `finally` steps ([`finish_interrupted`] removes it). Returns whether any process
/// was ended.
pub fn clean_up_interrupted(workspace_root: &Path, run: &skiff_core::run::RunId) -> bool {
    let ended = crate::process::end_interrupted(run.as_str());
    let prefix = step_file_prefix(run);
    if let Ok(entries) = std::fs::read_dir(workspace_root) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    ended
}

/// Step files (`$SKIFF_OUTPUT`, a long script) live beside the run's workspace, not in it, so a
/// step cannot clobber them by cleaning its workspace; they exist only while their step runs.
fn step_file_prefix(run: &skiff_core::run::RunId) -> String {
    format!("{run}.step-")
}

fn step_file(
    workspace_root: &Path,
    run: &skiff_core::run::RunId,
    index: usize,
    ext: &str,
) -> PathBuf {
    workspace_root.join(format!("{}{index}.{ext}", step_file_prefix(run)))
}

/// The shell that runs `run:` scripts: bash with `-eo pipefail`, or `sh -e` where there is no bash.
fn shell() -> &'static (PathBuf, Vec<&'static str>) {
    static SHELL: std::sync::OnceLock<(PathBuf, Vec<&'static str>)> = std::sync::OnceLock::new();
    SHELL.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bash = std::env::split_paths(&path)
            .map(|d| d.join("bash"))
            .find(|p| p.is_file());
        match bash {
            Some(bash) => (bash, vec!["--noprofile", "--norc", "-eo", "pipefail"]),
            None => (PathBuf::from("/bin/sh"), vec!["-e"]),
        }
    })
}

/// Writes a step file (a long script, an empty `$SKIFF_OUTPUT`) as a new file: never through
/// a link or over a file someone else made. It belongs to the step's user when there is one.
fn write_step_file(path: &Path, data: &[u8], owner: Option<(u32, u32)>) -> Result<(), RunnerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| RunnerError::Workspace {
        path: path.display().to_string(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(err)?;
    }
    f.write_all(data).map_err(err)
}

/// The most output text a step may leave in `$SKIFF_OUTPUT`.
pub const MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// The most outputs one step may set.
pub const MAX_OUTPUTS: usize = 1000;

/// A step's `$SKIFF_OUTPUT`, read: its values and the lines that could not be read.
type ReadOutputs = (BTreeMap<String, String>, Vec<String>);

/// Reads a step's `$SKIFF_OUTPUT` file (on a blocking thread: a big file takes a while to parse).
/// A file past the limits fails the step: the error names the limit.
async fn read_outputs(path: PathBuf, owner: Option<u32>) -> Result<ReadOutputs, String> {
    // Most steps set no outputs: one `stat` tells (no file, or the empty one made for an
    // isolated step), without a trip to a blocking thread and back.
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((BTreeMap::new(), Vec::new()));
        }
        Ok(m) if m.file_type().is_file() && m.len() == 0 => {
            let _ = std::fs::remove_file(&path);
            return Ok((BTreeMap::new(), Vec::new()));
        }
        _ => {}
    }
    tokio::task::spawn_blocking(move || read_outputs_now(&path, owner))
        .await
        .unwrap_or_else(|e| Err(format!("reading $SKIFF_OUTPUT failed: {e}")))
}

fn read_outputs_now(path: &Path, owner: Option<u32>) -> Result<ReadOutputs, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // Opened without following a link, and only if it is a regular file of the step's own: a
    // step cannot make skiff read a file it could not read itself.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    // Read once: a retried attempt starts with no outputs.
    let _ = std::fs::remove_file(path);
    let mut file = match file {
        // No file: the step set no outputs.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((BTreeMap::new(), Vec::new()));
        }
        Err(_) => return Err("$SKIFF_OUTPUT is not a regular file; it was not read".into()),
        Ok(f) => f,
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("reading $SKIFF_OUTPUT failed: {e}"))?;
    let own = owner.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    if !meta.file_type().is_file() || meta.uid() != own {
        return Err(
            "$SKIFF_OUTPUT is not a regular file of the step's own; it was not read".into(),
        );
    }
    let size = meta.len();
    if size > MAX_OUTPUT_BYTES {
        return Err(format!(
            "$SKIFF_OUTPUT holds {size} bytes, more than the limit of {MAX_OUTPUT_BYTES} bytes (1 MiB)"
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.by_ref()
        .take(MAX_OUTPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading $SKIFF_OUTPUT failed: {e}"))?;
    if bytes.len() as u64 > MAX_OUTPUT_BYTES {
        return Err(format!(
            "$SKIFF_OUTPUT holds more than the limit of {MAX_OUTPUT_BYTES} bytes (1 MiB)"
        ));
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (values, errors) = skiff_core::kv::parse(&text);
    if values.len() > MAX_OUTPUTS {
        return Err(format!(
            "$SKIFF_OUTPUT sets {} outputs, more than the limit of {MAX_OUTPUTS} per step",
            values.len()
        ));
    }
    // The line itself is not repeated: it could be anything the step could read.
    let problems = errors
        .into_iter()
        .map(|e| {
            format!(
                "$SKIFF_OUTPUT line {} is not NAME=value (or NAME<<DELIMITER ... DELIMITER); it was skipped",
                e.line
            )
        })
        .collect();
    Ok((values.into_iter().collect(), problems))
}

impl Runner<'_> {
    /// One attempt of a `run:` step.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt_script(
        &self,
        index: usize,
        step: &Step,
        script: &str,
        env: &[(String, String)],
        cwd: &Path,
        stop: &CancellationToken,
        step_deadline: Option<Instant>,
    ) -> Result<AttemptResult, RunnerError> {
        // No file is made for a step unless it needs one: the script is the shell's
        // `-c` argument (with the step's id as `$0`, which its error messages name), and
        // `$SKIFF_OUTPUT` is created by the step when it writes an output (made for it when
        // it runs isolated, below).
        let root = &self.opts.workspace_root;
        let output_path = step_file(root, &self.run.id, index, "out");
        let script_path = step_file(root, &self.run.id, index, "sh");
        let inline = script.len() <= INLINE_SCRIPT_MAX;
        let creds = self.user.as_ref().map(|u| crate::isolation::Creds {
            uid: u.uid,
            gid: u.gid,
            extra_group: self.extra_group,
        });
        let owner = creds.map(|c| (c.uid, c.gid));
        if !inline {
            write_step_file(&script_path, script.as_bytes(), owner)?;
        }
        let in_namespaces = matches!(self.opts.isolation, Isolation::Namespaces { .. });
        if owner.is_some() || in_namespaces {
            // The step cannot create files where step files live (a user of its own: the folder
            // is not its; in namespaces: only its own files are visible there): its
            // `$SKIFF_OUTPUT` is made for it (and cannot be swapped for a link).
            write_step_file(&output_path, b"", owner)?;
        }
        let mut env = env.to_vec();
        env.push(("SKIFF_OUTPUT".into(), output_path.display().to_string()));
        let (program, args) = shell();
        let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        if inline {
            argv.extend([
                std::ffi::OsStr::new("-c"),
                std::ffi::OsStr::new(script),
                std::ffi::OsStr::new(step.id.as_str()),
            ]);
        } else {
            argv.push(script_path.as_os_str());
        }
        // In namespaces, the shell is started by `skiff step-init` (see `isolation.rs`).
        let wrapped: Vec<&std::ffi::OsStr>;
        let program: &Path = match &self.opts.isolation {
            Isolation::Namespaces { init, hide } => {
                let mut w: Vec<&std::ffi::OsStr> = vec![std::ffi::OsStr::new("step-init")];
                for h in hide {
                    w.push(std::ffi::OsStr::new("--hide"));
                    w.push(h.as_os_str());
                }
                // The workspaces folder shows only this run's own folders and step files: other
                // runs (the same uid here) are out of sight.
                w.push(std::ffi::OsStr::new("--private"));
                w.push(self.opts.workspace_root.as_os_str());
                for keep in [
                    &self.dirs.workspace,
                    &self.dirs.home,
                    &self.dirs.tmp,
                    &output_path,
                ] {
                    w.push(std::ffi::OsStr::new("--keep"));
                    w.push(keep.as_os_str());
                }
                if !inline {
                    w.push(std::ffi::OsStr::new("--keep"));
                    w.push(script_path.as_os_str());
                }
                w.push(std::ffi::OsStr::new("--"));
                w.push(program.as_os_str());
                w.extend(argv.iter().copied());
                wrapped = w;
                init
            }
            _ => {
                wrapped = argv;
                program
            }
        };
        let argv = wrapped;
        let spec = Spawn {
            program,
            args: &argv,
            cwd,
            env: &env,
            tracker: &self.tracker,
            user: creds,
        };
        let ended = process::run(
            spec,
            &self.log,
            index as u32,
            &self.masker,
            step_deadline,
            stop,
            self.opts.kill_grace,
        )
        .await;
        let read = read_outputs(output_path, owner.map(|(uid, _)| uid)).await;
        if !inline {
            let _ = std::fs::remove_file(&script_path);
        }
        let mut outputs = match read {
            Ok((outputs, problems)) => {
                for p in problems {
                    self.log.note(Some(index as u32), &p).await;
                }
                outputs
            }
            Err(reason) => {
                self.log.note(Some(index as u32), &reason).await;
                if matches!(&ended, Ok(Ended::Exited(status)) if status.success()) {
                    return Ok(AttemptResult::failed(reason));
                }
                BTreeMap::new()
            }
        };
        if !self.masker.is_empty() {
            outputs
                .values_mut()
                .for_each(|v| *v = self.masker.mask_str(v));
        }
        Ok(match ended {
            Err(e) => AttemptResult::failed(format!(
                "could not start the shell {}: {e}",
                program.display()
            )),
            Ok(Ended::Exited(status)) => match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(0), _) => AttemptResult::succeeded(outputs),
                (Some(code), _) => AttemptResult {
                    exit_code: Some(code),
                    ..AttemptResult::failed(format!("failed with exit code {code}"))
                },
                (None, Some(sig)) => AttemptResult::failed(format!("was killed by signal {sig}")),
                (None, None) => AttemptResult::failed("ended abnormally".to_string()),
            },
            Ok(Ended::DeadlineReached) if self.step_timeout_hit(step, Instant::now()) => {
                AttemptResult {
                    status: StepStatus::TimedOut,
                    ..AttemptResult::failed(format!(
                        "timed out after {}",
                        human(step.timeout.unwrap_or(FINALLY_DEFAULT_TIMEOUT))
                    ))
                }
            }
            Ok(Ended::DeadlineReached | Ended::Stopped) => self.stopped_result(step.phase),
        })
    }
}
