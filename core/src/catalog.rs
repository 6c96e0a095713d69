//! The pipelines folder: every file loaded and checked, kept current as files change.
//!
//! A bad file never takes the others down: it is listed as invalid, with its diagnostics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::diag::{Diagnostic, Pos};
use crate::pipeline::{self, Pipeline};

/// One pipeline file.
#[derive(Debug)]
pub struct Entry {
    /// The pipeline's name (for an invalid file that names none, its file stem).
    pub name: String,
    pub file: PathBuf,
    pub source: String,
    /// The loaded pipeline, when the file is valid.
    pub pipeline: Option<Arc<Pipeline>>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Entry {
    pub fn is_valid(&self) -> bool {
        self.pipeline.is_some()
    }
}

/// A consistent view of the folder at one moment.
#[derive(Debug, Default)]
pub struct Catalog {
    pub dir: PathBuf,
    /// What the loader was told (skiff's registries): a reload is told the same.
    pub options: pipeline::LoadOptions,
    entries: BTreeMap<String, Arc<Entry>>,
    /// What the folder looked like when loaded: (file, modified, size).
    stamp: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

/// The YAML files of a folder (not its subfolders), sorted. Anything named `*.yml` or `*.yaml`
/// that is not a folder is listed, so that a FIFO or a device under such a name is reported by
/// `load_file` rather than skipped in silence.
pub fn pipeline_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if !p.is_dir() && p.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads a pipeline file: a regular file of at most `max` bytes. Anything else (a FIFO, a
/// device, a folder, a file that is too large) is refused without waiting or reading on: the
/// file is opened non-blocking (opening a FIFO would wait for a writer), checked through the open
/// handle, and read no further than `max` bytes even if it grows meanwhile.
pub fn read_file(path: &Path, max: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits());
    }
    let file = options
        .open(path)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "not a regular file ({}); a pipeline is read from a regular file",
            file_kind(&meta.file_type())
        ));
    }
    let too_large =
        |size: u64| format!("the file is {size} bytes, more than the limit of {max} bytes");
    if meta.len() > max as u64 {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(max));
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() > max {
        return Err(format!(
            "the file grew past the limit of {max} bytes while it was read"
        ));
    }
    Ok(bytes)
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() { "a folder" } else { "not a file" }
}

/// The name a file gives a pipeline that has no `name:`: its stem.
pub fn default_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads and loads one file; an unreadable, oversized, non-regular or non-UTF-8 file is a
/// diagnostic too.
pub fn load_file(path: &Path) -> (String, Result<Pipeline, Vec<Diagnostic>>) {
    load_file_with(path, &pipeline::LoadOptions::default())
}

/// [`load_file`], with what skiff's config declares.
pub fn load_file_with(
    path: &Path,
    options: &pipeline::LoadOptions,
) -> (String, Result<Pipeline, Vec<Diagnostic>>) {
    match read_file(path, crate::yaml::Limits::default().max_bytes) {
        Err(e) => (String::new(), Err(vec![Diagnostic::new(Pos::new(1, 1), e)])),
        Ok(bytes) => match String::from_utf8(bytes) {
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let text = String::from_utf8_lossy(&e.into_bytes()[..at]).into_owned();
                let line = text.matches('\n').count() as u32 + 1;
                let col = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u32 + 1;
                (
                    text,
                    Err(vec![Diagnostic::new(
                        Pos::new(line, col),
                        "the file is not valid UTF-8",
                    )]),
                )
            }
            Ok(text) => {
                let loaded = pipeline::load_with(&text, &default_name(path), options);
                (text, loaded)
            }
        },
    }
}

fn stamp_of(files: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).ok();
            (
                f.clone(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map_or(0, |m| m.len()),
            )
        })
        .collect()
}

/// A best guess at the `name:` of a file that did not load, so it keeps its place in lists.
fn guess_name(source: &str, file: &Path) -> String {
    source
        .lines()
        .find_map(|l| l.strip_prefix("name:"))
        .map(|n| n.trim().trim_matches(['"', '\'']).to_string())
        .filter(|n| pipeline::valid_name(n))
        .unwrap_or_else(|| default_name(file))
}

/// Pipelines that share a webhook (`on.webhook.hook`) must check its signature with the same
/// secret: one delivery is signed once. Of `pipelines` (by name), the first that names a hook
/// sets its secret; each that names another secret gets a diagnostic at its `secret:` (by its
/// index in `pipelines`). `skiff validate` and the catalog both ask this.
pub fn shared_hook_problems(pipelines: &[(&str, &Pipeline)]) -> Vec<(usize, Diagnostic)> {
    let mut first: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, (name, p)) in pipelines.iter().enumerate() {
        let Some(hook) = p.on.webhook.as_ref() else {
            continue;
        };
        match first.get(hook.hook.as_str()) {
            None => {
                first.insert(&hook.hook, (name, &hook.secret_name));
            }
            Some((owner, secret)) if *secret != hook.secret_name => {
                let mut d = Diagnostic::new(
                    hook.secret_pos,
                    format!(
                        "hook `{}` is shared with pipeline `{owner}`, which checks it with secret `{secret}`, not `{}`",
                        hook.hook, hook.secret_name
                    ),
                );
                d.help = Some(format!(
                    "a delivery is signed with one secret: use `${{{{ secrets.{secret} }}}}`, or give this pipeline its own `hook:`"
                ));
                problems.push((i, d));
            }
            Some(_) => {}
        }
    }
    problems
}

fn check_shared_hooks(entries: &mut BTreeMap<String, Entry>) {
    let problems = {
        let valid: Vec<(&str, &Pipeline)> = entries
            .values()
            .filter_map(|e| Some((e.name.as_str(), e.pipeline.as_deref()?)))
            .collect();
        shared_hook_problems(&valid)
            .into_iter()
            .map(|(i, d)| (valid[i].0.to_string(), d))
            .collect::<Vec<_>>()
    };
    for (name, d) in problems {
        if let Some(entry) = entries.get_mut(&name) {
            entry.diagnostics.insert(0, d);
            entry.pipeline = None;
        }
    }
}

impl Catalog {
    /// Loads every pipeline file in `dir`. A missing folder is an empty catalog.
    pub fn load(dir: &Path) -> Catalog {
        Catalog::load_with(dir, &pipeline::LoadOptions::default())
    }

    /// [`Catalog::load`], with what skiff's config declares.
    pub fn load_with(dir: &Path, options: &pipeline::LoadOptions) -> Catalog {
        let files = pipeline_files(dir).unwrap_or_default();
        let stamp = stamp_of(&files);
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for file in files {
            let (source, loaded) = load_file_with(&file, options);
            let mut entry = match loaded {
                Ok(p) => Entry {
                    name: p.name.clone(),
                    file,
                    source,
                    pipeline: Some(Arc::new(p)),
                    diagnostics: Vec::new(),
                },
                Err(diagnostics) => Entry {
                    name: guess_name(&source, &file),
                    file,
                    source,
                    pipeline: None,
                    diagnostics,
                },
            };
            if let Some(first) = entries.get(&entry.name) {
                let taken = format!(
                    "the name `{}` is already used by {}",
                    entry.name,
                    first.file.display()
                );
                entry
                    .diagnostics
                    .insert(0, Diagnostic::new(Pos::new(1, 1), taken));
                entry.pipeline = None;
                entry.name = format!(
                    "{} ({})",
                    entry.name,
                    entry
                        .file
                        .file_name()
                        .map(|f| f.to_string_lossy())
                        .unwrap_or_default()
                );
            }
            entries.insert(entry.name.clone(), entry);
        }
        check_shared_hooks(&mut entries);
        let entries = entries.into_iter().map(|(k, e)| (k, Arc::new(e))).collect();
        Catalog {
            dir: dir.to_path_buf(),
            options: options.clone(),
            entries,
            stamp,
        }
    }

    /// Whether the folder changed since this catalog was loaded.
    pub fn is_stale(&self) -> bool {
        let files = pipeline_files(&self.dir).unwrap_or_default();
        stamp_of(&files) != self.stamp
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.entries.get(name)
    }

    /// Every entry, by name.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_folder_and_notices_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yml"), "steps:\n  - run: echo a\n").expect("write");
        std::fs::write(
            dir.path().join("b.yml"),
            "name: a\nsteps:\n  - run: echo b\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("bad.yaml"), "name: broken\nstpes: []\n").expect("write");
        std::fs::write(dir.path().join("notes.md"), "ignored").expect("write");
        let c = Catalog::load(dir.path());
        assert_eq!(c.len(), 3);
        assert!(c.get("a").is_some_and(|e| e.is_valid()));
        let dup = c.entries().find(|e| e.file.ends_with("b.yml")).expect("b");
        assert!(!dup.is_valid() && dup.diagnostics[0].message.contains("already used"));
        let broken = c.get("broken").expect("invalid files keep their name");
        assert!(!broken.is_valid() && !broken.diagnostics.is_empty());
        assert!(!c.is_stale());
        std::fs::write(dir.path().join("c.yml"), "steps:\n  - run: echo c\n").expect("write");
        assert!(c.is_stale());
    }

    #[test]
    fn pipelines_sharing_a_hook_share_its_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooked = |secret: &str| {
            format!(
                "on:\n  webhook:\n    hook: repo\n    secret: ${{{{ secrets.{secret} }}}}\nsteps:\n  - run: echo\n"
            )
        };
        std::fs::write(dir.path().join("build.yml"), hooked("REPO_HOOK")).expect("write");
        std::fs::write(dir.path().join("deploy.yml"), hooked("REPO_HOOK")).expect("write");
        std::fs::write(dir.path().join("lint.yml"), hooked("OTHER")).expect("write");
        let c = Catalog::load(dir.path());
        assert!(c.get("build").is_some_and(|e| e.is_valid()));
        assert!(c.get("deploy").is_some_and(|e| e.is_valid()));
        let lint = c.get("lint").expect("lint");
        assert!(!lint.is_valid());
        let d = &lint.diagnostics[0];
        assert_eq!((d.pos.line, d.pos.col), (4, 13), "at the secret");
        assert!(
            d.message.contains("shared with pipeline `build`") && d.message.contains("REPO_HOOK"),
            "{}",
            d.message
        );
    }

    /// Runs `f` on a thread and fails the test if it does not finish in time: a FIFO opened for
    /// reading would otherwise block the test forever.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading the folder hung")
    }

    #[test]
    fn only_regular_files_are_read_and_never_past_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo.yml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.yml")).expect("symlink");
        let limit = crate::yaml::Limits::default().max_bytes;
        std::fs::write(dir.path().join("big.yml"), vec![b'#'; limit + 1]).expect("write");
        std::fs::write(dir.path().join("ok.yml"), "steps:\n  - run: echo\n").expect("write");
        let path = dir.path().to_path_buf();
        let c = within(move || Catalog::load(&path));
        let message = |name: &str| -> String {
            let e = c.get(name).unwrap_or_else(|| panic!("{name} is listed"));
            assert!(!e.is_valid());
            e.diagnostics[0].message.clone()
        };
        assert_eq!(
            message("fifo"),
            "not a regular file (a FIFO); a pipeline is read from a regular file"
        );
        assert_eq!(
            message("zero"),
            "not a regular file (a character device); a pipeline is read from a regular file"
        );
        assert_eq!(
            message("big"),
            format!(
                "the file is {} bytes, more than the limit of {limit} bytes",
                limit + 1
            )
        );
        assert!(c.get("ok").is_some_and(|e| e.is_valid()));
        assert!(within(move || read_file(Path::new("/dev/zero"), 1 << 20)).is_err());
    }
}
