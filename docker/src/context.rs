//! A build context: the folder a step names, sent to the engine as a tar. The folder is opened
//! one name at a time without following links, from the run's workspace down, and walked the
//! same way: a link is sent as a link (the engine keeps it a link), never as what it points to,
//! so a step that plants `ln -s /var/lib/skiff/skiff.db` sends a link, not the database. Only
//! regular files, folders and links go in. `.dockerignore` is honoured as the Docker CLI does
//! (patterns, `**`, `!` exceptions, the last match wins, a folder's match covers what is in it);
//! the Dockerfile and `.dockerignore` themselves are always sent.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};

/// Why a context could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("the context `{0}` must be a relative path inside the workspace, without `..`")]
    Outside(String),
    #[error("the context `{path}`: {source}")]
    Open { path: String, source: io::Error },
    #[error("the context is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("writing the context: {0}")]
    Write(io::Error),
}

/// What went into a context.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContextSummary {
    pub files: u64,
    pub bytes: u64,
    /// Entries left out for what they are (a fifo, a socket, a device), by path.
    pub skipped: Vec<String>,
}

/// The largest context sent (the engine copies it whole before building).
pub const MAX_CONTEXT_BYTES: u64 = 4 << 30;

/// A made context: an unnamed temporary file holding the tar, at its start.
pub struct Context {
    pub tar: File,
    pub size: u64,
    pub summary: ContextSummary,
}

/// Makes the tar of `workspace/relative` (blocking: run it on a blocking thread).
/// `dockerfile` is the Dockerfile's path inside the context (always sent).
pub fn make(workspace: &Path, relative: &str, dockerfile: &str) -> Result<Context, ContextError> {
    let rel = Path::new(relative);
    let mut names: Vec<&OsStr> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            _ => return Err(ContextError::Outside(relative.to_string())),
        }
    }
    let open_err = |source| ContextError::Open {
        path: relative.to_string(),
        source,
    };
    let mut dir = open_dir(None, workspace.as_os_str()).map_err(open_err)?;
    for name in names {
        dir = open_dir(Some(&dir), name).map_err(open_err)?;
    }
    let ignore = read_ignore(&dir).map_err(open_err)?;
    let always: Vec<PathBuf> = [PathBuf::from(dockerfile), PathBuf::from(".dockerignore")]
        .into_iter()
        .map(|p| p.components().collect())
        .collect();
    let file = tempfile::tempfile().map_err(ContextError::Write)?;
    let mut walk = Walk {
        tar: tar::Builder::new(file),
        ignore,
        always,
        summary: ContextSummary::default(),
    };
    walk.dir(&dir, &mut PathBuf::new())?;
    let mut file = walk.tar.into_inner().map_err(ContextError::Write)?;
    let size = file.seek(SeekFrom::End(0)).map_err(ContextError::Write)?;
    file.seek(SeekFrom::Start(0)).map_err(ContextError::Write)?;
    Ok(Context {
        tar: file,
        size,
        summary: walk.summary,
    })
}

fn open_dir(at: Option<&OwnedFd>, name: &OsStr) -> io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match at {
        Some(dir) => openat(dir.as_fd(), name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    };
    fd.map_err(|e| match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => io::Error::other(format!(
            "{} is not a folder (a link is not followed)",
            name.to_string_lossy()
        )),
        e => io::Error::from(e),
    })
}

fn read_ignore(dir: &OwnedFd) -> io::Result<Ignore> {
    use std::io::Read;
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let fd = match openat(dir.as_fd(), ".dockerignore", flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Ignore::default()),
        Err(e) => return Err(io::Error::other(format!(".dockerignore: {e}"))),
    };
    let mut text = String::new();
    File::from(fd)
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| io::Error::other(format!(".dockerignore: {e}")))?;
    Ok(Ignore::parse(&text))
}

struct Walk {
    tar: tar::Builder<File>,
    ignore: Ignore,
    always: Vec<PathBuf>,
    summary: ContextSummary,
}

impl Walk {
    fn dir(&mut self, dir: &OwnedFd, at: &mut PathBuf) -> Result<(), ContextError> {
        let io_err = |at: &Path, e: io::Error| ContextError::Open {
            path: at.display().to_string(),
            source: e,
        };
        let mut names: Vec<OsString> = Vec::new();
        let listing = nix::dir::Dir::from_fd(
            nix::unistd::dup(dir.as_fd()).map_err(|e| io_err(at, e.into()))?,
        )
        .map_err(|e| io_err(at, e.into()))?;
        for entry in listing {
            let entry = entry.map_err(|e| io_err(at, e.into()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_os_string());
            }
        }
        // The same context makes the same tar (the engine's cache compares them).
        names.sort();
        for name in names {
            at.push(&name);
            let result = self.entry(dir, &name, at);
            at.pop();
            result?;
        }
        Ok(())
    }

    fn entry(&mut self, dir: &OwnedFd, name: &OsStr, at: &Path) -> Result<(), ContextError> {
        let io_err = |e: io::Error| ContextError::Open {
            path: at.display().to_string(),
            source: e,
        };
        let st = fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(e.into()))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let excluded = self.ignore.excludes(at) && !self.always.iter().any(|a| a == at);
        if kind == SFlag::S_IFDIR {
            // An excluded folder is still walked when an exception may bring something in it back.
            if excluded && !self.ignore.has_exceptions() {
                return Ok(());
            }
            let sub = open_dir(Some(dir), name).map_err(io_err)?;
            if !excluded {
                let mut h = header(&st, tar::EntryType::Directory);
                self.tar
                    .append_data(&mut h, at, io::empty())
                    .map_err(ContextError::Write)?;
            }
            let mut at = at.to_path_buf();
            return self.dir(&sub, &mut at);
        }
        if excluded {
            return Ok(());
        }
        if kind == SFlag::S_IFLNK {
            let target = readlinkat(dir.as_fd(), name).map_err(|e| io_err(e.into()))?;
            let mut h = header(&st, tar::EntryType::Symlink);
            self.tar
                .append_link(&mut h, at, Path::new(&target))
                .map_err(ContextError::Write)?;
        } else if kind == SFlag::S_IFREG {
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
            let fd =
                openat(dir.as_fd(), name, flags, Mode::empty()).map_err(|e| io_err(e.into()))?;
            // What was opened is what is sent: checked again on the open file.
            let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| io_err(e.into()))?;
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                return Err(io_err(io::Error::other("changed while it was read")));
            }
            let size = u64::try_from(st.st_size).unwrap_or(0);
            self.summary.files += 1;
            self.summary.bytes += size;
            if self.summary.bytes > MAX_CONTEXT_BYTES {
                return Err(ContextError::TooLarge {
                    limit: MAX_CONTEXT_BYTES,
                });
            }
            let mut h = header(&st, tar::EntryType::Regular);
            h.set_size(size);
            let file = File::from(fd);
            use std::io::Read;
            self.tar
                .append_data(&mut h, at, file.take(size))
                .map_err(ContextError::Write)?;
        } else {
            self.summary.skipped.push(at.display().to_string());
        }
        Ok(())
    }
}

fn header(st: &FileStat, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(0);
    h
}

/// `.dockerignore`: its patterns in order; the last one that matches a path decides.
#[derive(Debug, Default, Clone)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    parts: Vec<String>,
    exception: bool,
}

impl Ignore {
    pub fn parse(text: &str) -> Ignore {
        let mut patterns = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, line) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let parts: Vec<String> = line
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .map(str::to_string)
                .collect();
            if !parts.is_empty() {
                patterns.push(Pattern { parts, exception });
            }
        }
        Ignore { patterns }
    }

    fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether `path` (relative to the context) is left out: by a pattern matching it or one of
    /// the folders it is in, unless a later exception matches.
    pub fn excludes(&self, path: &Path) -> bool {
        let parts: Vec<String> = path
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let mut excluded = false;
        for p in &self.patterns {
            let hit = (1..=parts.len()).any(|n| match_parts(&p.parts, &parts[..n]));
            if hit {
                excluded = !p.exception;
            }
        }
        excluded
    }
}

fn match_parts(pattern: &[String], path: &[String]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_parts(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((name, path_rest)) => {
                glob(first.as_bytes(), name.as_bytes()) && match_parts(rest, path_rest)
            }
            None => false,
        },
    }
}

/// One name against one pattern part: `*`, `?`, `[a-z]` / `[^a-z]`, `\x`.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob(rest, &s[1..]),
        Some((b'[', rest)) => {
            let Some(end) = rest.iter().position(|&c| c == b']') else {
                return s.first() == Some(&b'[') && glob(rest, &s[1..]);
            };
            let Some((&c, s_rest)) = s.split_first() else {
                return false;
            };
            let (negate, class) = match rest[..end].split_first() {
                Some((b'^' | b'!', class)) => (true, class),
                _ => (false, &rest[..end]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob(&rest[end + 1..], s_rest)
        }
        Some((b'\\', rest)) if !rest.is_empty() => {
            s.first() == Some(&rest[0]) && glob(&rest[1..], &s[1..])
        }
        Some((&c, rest)) => s.first() == Some(&c) && glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ignore: &str, path: &str) -> bool {
        Ignore::parse(ignore).excludes(Path::new(path))
    }

    #[test]
    fn a_context_holds_files_folders_and_links_as_links() {
        let ws = tempfile::tempdir().expect("tempdir");
        let app = ws.path().join("app");
        std::fs::create_dir_all(app.join("src")).expect("mkdir");
        std::fs::write(app.join("src/main.txt"), "code").expect("write");
        std::fs::write(app.join("Dockerfile"), "FROM scratch").expect("write");
        std::fs::write(app.join("debug.log"), "noise").expect("write");
        std::fs::write(app.join(".dockerignore"), "*.log\nDockerfile\n").expect("write");
        std::fs::write(ws.path().join("secret"), "outside").expect("write");
        std::os::unix::fs::symlink(ws.path().join("secret"), app.join("leak")).expect("link");
        nix::unistd::mkfifo(&app.join("pipe"), Mode::from_bits_truncate(0o600)).expect("fifo");
        let made = make(ws.path(), "app", "Dockerfile").expect("context");
        let mut archive = tar::Archive::new(made.tar);
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let kind = entry.header().entry_type();
            let mut body = String::new();
            std::io::Read::read_to_string(&mut entry, &mut body).expect("read");
            seen.push((path, kind, body));
        }
        let names: Vec<&str> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [".dockerignore", "Dockerfile", "leak", "src", "src/main.txt"],
            "ignored files stay out, the Dockerfile and .dockerignore always go"
        );
        let leak = seen.iter().find(|(p, _, _)| p == "leak").expect("leak");
        assert_eq!(leak.1, tar::EntryType::Symlink);
        assert!(leak.2.is_empty(), "a link carries no content");
        assert_eq!(made.summary.skipped, ["pipe"]);
        for bad in ["../x", "/etc", "app/../.."] {
            assert!(matches!(
                make(ws.path(), bad, "Dockerfile"),
                Err(ContextError::Outside(_))
            ));
        }
        std::os::unix::fs::symlink(ws.path(), ws.path().join("loop")).expect("link");
        let e = make(ws.path(), "loop/app", "Dockerfile")
            .err()
            .expect("a link as context");
        assert!(e.to_string().contains("not a folder"), "{e}");
    }

    #[test]
    fn dockerignore_patterns() {
        assert!(ex("*.log", "a.log"));
        assert!(!ex("*.log", "dir/a.log"), "`*` stays in one folder");
        assert!(ex("**/*.log", "dir/sub/a.log"));
        assert!(ex("**/*.log", "a.log"));
        assert!(
            ex("target", "target/debug/x"),
            "a folder's match covers its contents"
        );
        assert!(ex("/secret", "secret"));
        assert!(!ex("*.md\n!README.md", "README.md"), "the last match wins");
        assert!(ex("*.md\n!README.md", "NOTES.md"));
        assert!(ex("file?.txt", "file1.txt"));
        assert!(!ex("file?.txt", "file10.txt"));
        assert!(ex("[a-c]*", "beta"));
        assert!(!ex("[^a-c]*", "beta"));
        assert!(ex("# comment\n\n  .git  ", ".git/config"));
        assert!(!ex("", "anything"));
    }
}
