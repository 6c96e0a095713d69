//! `git/checkout`: fetches into a private folder beside the workspace (the worker's, where no
//! step can plant a link), gives the files to the run's user, then moves them into the
//! workspace through directory handles opened without following links. Credentials live in
//! that private folder for the fetch only: a deploy key as a 0600 file, a token in git's
//! environment as an `http.extraHeader`; git runs with no config but its own, no prompt, and
//! only the http(s), git and ssh transports.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;
use skiff_core::actions::Val;
use skiff_core::actions::git::{Checkout, CheckoutOutputs, CheckoutWith, GitUrl};

use super::{ActionContext, ActionError, Execute};

#[async_trait]
impl Execute for Checkout {
    async fn execute(
        with: CheckoutWith,
        cx: &ActionContext<'_>,
    ) -> Result<CheckoutOutputs, ActionError> {
        let url = with.repository.get().map_err(ActionError::Inputs)?.clone();
        let git_ref = Val::opt(&with.git_ref)
            .map_err(ActionError::Inputs)?
            .map(|r| r.0)
            .filter(|r| !r.is_empty());
        let sha = Val::opt(&with.sha)
            .map_err(ActionError::Inputs)?
            .map(|s| s.0)
            .filter(|s| !s.is_empty());
        let path = Val::opt(&with.path)
            .map_err(ActionError::Inputs)?
            .map(|p| p.0)
            .unwrap_or_default();
        let depth = Val::opt(&with.depth)
            .map_err(ActionError::Inputs)?
            .unwrap_or(CheckoutWith::DEFAULT_DEPTH);
        let text = |v: &Option<Val<String>>| -> Result<Option<String>, ActionError> {
            Ok(Val::opt(v)
                .map_err(ActionError::Inputs)?
                .filter(|s| !s.is_empty()))
        };
        let ssh_key = text(&with.ssh_key)?;
        let known_hosts = text(&with.known_hosts)?;
        let token = text(&with.token)?;
        let username =
            text(&with.username)?.unwrap_or_else(|| CheckoutWith::DEFAULT_USERNAME.to_string());
        if ssh_key.is_some() && !url.is_ssh() {
            return Err(ActionError::Inputs(format!(
                "`ssh_key` is for ssh URLs; `{}` is not one",
                url.shown()
            )));
        }
        if token.is_some() && !url.is_http() {
            return Err(ActionError::Inputs(format!(
                "`token` is for https URLs; `{}` is not one",
                url.shown()
            )));
        }

        let private = Private::create(cx)?;
        let git = Git::new(
            &private,
            &url,
            ssh_key.as_deref(),
            known_hosts.as_deref(),
            token.as_deref(),
            &username,
        )
        .map_err(|e| ActionError::failed(format!("preparing the credentials: {e}")))?;
        if url.is_ssh() && known_hosts.is_none() {
            cx.note("git/checkout: no `known_hosts` given: the key the server shows is trusted")
                .await;
        }
        let repo = private.dir.join("repo");
        let repo_text = repo.to_string_lossy().into_owned();
        git.run(cx, &["init", "-q", &repo_text]).await?;
        git.run(cx, &["-C", &repo_text, "remote", "add", "origin", &url.0])
            .await?;
        let depth_arg = format!("--depth={depth}");
        let fetch = |what: String| {
            let mut args = vec![
                "-C".to_string(),
                repo_text.clone(),
                "fetch".into(),
                "-q".into(),
                "--no-tags".into(),
                "--no-recurse-submodules".into(),
            ];
            if depth > 0 {
                args.push(depth_arg.clone());
            }
            args.push("origin".into());
            args.push(what);
            args
        };
        let wanted = git_ref.clone().unwrap_or_else(|| "HEAD".into());
        let fetched_sha = match &sha {
            Some(sha) => match git.run_strings(cx, &fetch(sha.clone())).await {
                Ok(_) => true,
                // A server that does not hand out commits by id: the ref's history then.
                Err(ActionError::Failed { .. }) => false,
                Err(e) => return Err(e),
            },
            None => false,
        };
        if !fetched_sha {
            git.run_strings(cx, &fetch(wanted.clone())).await?;
        }
        let target = match &sha {
            Some(s) => s.clone(),
            None => "FETCH_HEAD".into(),
        };
        if let Err(e) = git
            .run(
                cx,
                &["-C", &repo_text, "checkout", "-q", "--detach", &target],
            )
            .await
        {
            return Err(match (&sha, e) {
                (Some(s), ActionError::Failed { .. }) => ActionError::refused(format!(
                    "commit {s} is not in the last {depth} commit(s) of `{wanted}`: give `depth: 0` to fetch the whole history"
                )),
                (_, e) => e,
            });
        }
        let head = git
            .run(cx, &["-C", &repo_text, "rev-parse", "HEAD"])
            .await?
            .trim()
            .to_string();
        if let Some(s) = &sha
            && !head.eq_ignore_ascii_case(s)
        {
            return Err(ActionError::refused(format!(
                "checked out {head}, not the commit asked for ({s})"
            )));
        }
        let owner = cx.owner;
        let repo_for_move = repo.clone();
        let workspace = cx.workspace.to_path_buf();
        let dest = path.clone();
        tokio::task::spawn_blocking(move || {
            if let Some((uid, gid)) = owner {
                give(&repo_for_move, uid, gid)?;
            }
            move_into(&repo_for_move, &workspace, &dest, owner)
        })
        .await
        .map_err(|e| ActionError::failed(format!("moving the checkout: {e}")))?
        .map_err(ActionError::refused)?;
        cx.note(&format!(
            "git/checkout: {} {wanted} at {head}{} into {}",
            url.shown(),
            if depth == 0 {
                String::new()
            } else {
                format!(" (depth {depth})")
            },
            if path.is_empty() {
                "the workspace"
            } else {
                &path
            }
        ))
        .await;
        Ok(CheckoutOutputs {
            sha: head,
            git_ref: wanted,
        })
    }
}

/// The worker's own folder beside the run's workspace (same filesystem, so the checkout can be
/// moved in; 0700 and the worker's, so no step reaches it). Removed when dropped.
struct Private {
    dir: PathBuf,
}

impl Private {
    fn create(cx: &ActionContext<'_>) -> Result<Private, ActionError> {
        let name = cx
            .workspace
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = cx.workspace.parent().unwrap_or(Path::new("/"));
        let dir = parent.join(format!("{name}.checkout-{}-{}", cx.step, cx.attempt));
        // What a crashed attempt left.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ActionError::failed(format!("creating {}: {e}", dir.display())))?;
        Ok(Private { dir })
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// git, with nothing of the worker's environment but PATH.
struct Git {
    env: Vec<(String, OsString)>,
}

impl Git {
    fn new(
        private: &Private,
        url: &GitUrl,
        ssh_key: Option<&str>,
        known_hosts: Option<&str>,
        token: Option<&str>,
        username: &str,
    ) -> std::io::Result<Git> {
        let home = private.dir.join("home");
        std::fs::DirBuilder::new().mode(0o700).create(&home)?;
        let mut env: Vec<(String, OsString)> = vec![
            ("HOME".into(), home.clone().into()),
            ("GIT_TERMINAL_PROMPT".into(), "0".into()),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
            ("GIT_ALLOW_PROTOCOL".into(), "https:http:git:ssh".into()),
            ("LC_ALL".into(), "C".into()),
        ];
        if let Some(path) = std::env::var_os("PATH") {
            env.push(("PATH".into(), path));
        }
        let mut config: Vec<(&str, String)> = vec![
            ("core.hooksPath", "/dev/null".into()),
            ("protocol.file.allow", "never".into()),
            ("advice.detachedHead", "false".into()),
        ];
        if let Some(token) = token {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{token}"));
            config.push(("http.extraHeader", format!("Authorization: Basic {basic}")));
        }
        env.push(("GIT_CONFIG_COUNT".into(), config.len().to_string().into()));
        for (i, (k, v)) in config.into_iter().enumerate() {
            env.push((format!("GIT_CONFIG_KEY_{i}"), k.into()));
            env.push((format!("GIT_CONFIG_VALUE_{i}"), v.into()));
        }
        if url.is_ssh() {
            let hosts = home.join("known_hosts");
            write_private(&hosts, known_hosts.unwrap_or(""))?;
            let mut ssh = format!(
                "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking={}",
                quote(&hosts),
                if known_hosts.is_some() {
                    "yes"
                } else {
                    "accept-new"
                }
            );
            if let Some(key) = ssh_key {
                let file = home.join("key");
                let mut text = key.replace("\r\n", "\n");
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                write_private(&file, &text)?;
                ssh.push_str(&format!(" -i {}", quote(&file)));
            }
            env.push(("GIT_SSH_COMMAND".into(), ssh.into()));
        }
        Ok(Git { env })
    }

    async fn run(&self, cx: &ActionContext<'_>, args: &[&str]) -> Result<String, ActionError> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.run_strings(cx, &args).await
    }

    /// Runs git; its stdout, or its stderr as the failure. Stopped with the step.
    async fn run_strings(
        &self,
        cx: &ActionContext<'_>,
        args: &[String],
    ) -> Result<String, ActionError> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            ActionError::refused(format!("git cannot be started on this worker: {e}"))
        })?;
        let out = tokio::select! {
            out = child.wait_with_output() => out.map_err(|e| ActionError::failed(format!("git: {e}")))?,
            () = cx.stop.cancelled() => return Err(ActionError::Stopped("stopped while git ran".into())),
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let what = args
                .iter()
                .find(|a| a.as_str() != "-C" && !a.starts_with('/'))
                .cloned()
                .unwrap_or_default();
            Err(ActionError::failed(format!(
                "git {what} failed: {}",
                err.trim().chars().take(2000).collect::<String>()
            )))
        }
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// A path as one word of `GIT_SSH_COMMAND` (which a shell reads).
fn quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"))
}

/// Gives every file under `dir` to the run's user, links themselves (never what they point
/// at). Nobody else can write in the private folder, so nothing moves under this walk.
fn give(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::os::unix::fs::lchown(&d, Some(uid), Some(gid))
            .map_err(|e| format!("{}: {e}", d.display()))?;
        for entry in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            let kind = entry.file_type().map_err(|e| e.to_string())?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))
                    .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}

fn open_dir(at: impl AsFd, name: &str) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(
        at,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
}

/// Moves the checkout into `dest`, a folder of the workspace that is empty or absent (the
/// workspace itself when empty): every folder on the way is opened without following links,
/// so a link a step planted cannot send the files (or a folder made as the worker) elsewhere.
fn move_into(
    repo: &Path,
    workspace: &Path,
    dest: &str,
    owner: Option<(u32, u32)>,
) -> Result<(), String> {
    let ws = nix::fcntl::open(
        workspace,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the workspace: {e}"))?;
    let parts: Vec<&str> = dest
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let Some((last, folders)) = parts.split_last() else {
        // Into the workspace itself: entry by entry, never replacing one.
        let from = std::fs::read_dir(repo).map_err(|e| e.to_string())?;
        let repo_fd = nix::fcntl::open(
            repo,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| e.to_string())?;
        for entry in from {
            let name = entry.map_err(|e| e.to_string())?.file_name();
            nix::fcntl::renameat2(&repo_fd, name.as_os_str(), &ws, name.as_os_str(), RenameFlags::RENAME_NOREPLACE)
                .map_err(|e| match e {
                    Errno::EEXIST | Errno::ENOTEMPTY => format!(
                        "the workspace already holds `{}`: check out into an empty workspace, or give `path`",
                        name.to_string_lossy()
                    ),
                    e => format!("moving `{}` into the workspace: {e}", name.to_string_lossy()),
                })?;
        }
        return Ok(());
    };
    let mut at = ws;
    for part in folders {
        at = match open_dir(&at, part) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                nix::sys::stat::mkdirat(&at, *part, Mode::from_bits_truncate(0o755))
                    .map_err(|e| format!("creating `{part}`: {e}"))?;
                if let Some((uid, gid)) = owner {
                    nix::unistd::fchownat(
                        &at,
                        *part,
                        Some(uid.into()),
                        Some(gid.into()),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| format!("`{part}`: {e}"))?;
                }
                open_dir(&at, part).map_err(|e| format!("`{part}`: {e}"))?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(format!(
                    "`{dest}`: `{part}` is not a folder (a link, or a file)"
                ));
            }
            Err(e) => return Err(format!("`{dest}`: `{part}`: {e}")),
        };
    }
    let parent = repo.parent().ok_or("no private folder")?;
    let parent_fd = nix::fcntl::open(
        parent,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| e.to_string())?;
    let mut tried_empty = false;
    loop {
        match nix::fcntl::renameat2(
            &parent_fd,
            "repo",
            &at,
            *last,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(()),
            Err(Errno::EEXIST) if !tried_empty => {
                // An empty folder is taken (rmdir refuses anything else, links included).
                tried_empty = true;
                if nix::unistd::unlinkat(&at, *last, nix::unistd::UnlinkatFlags::RemoveDir).is_err()
                {
                    return Err(format!(
                        "`{dest}` is not empty: check out into an empty or new folder"
                    ));
                }
            }
            Err(Errno::EEXIST) => {
                return Err(format!(
                    "`{dest}` is not empty: check out into an empty or new folder"
                ));
            }
            Err(e) => return Err(format!("moving the checkout to `{dest}`: {e}")),
        }
    }
}
