//! `skiff validate`: load pipeline files and print every diagnostic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use skiff_core::diag::{Diagnostic, Pos, Report};
use skiff_core::pipeline;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Pipeline files, or folders whose *.yml and *.yaml files are checked
    #[arg(value_name = "PATH", default_value = "pipelines")]
    paths: Vec<PathBuf>,
    /// Print nothing for valid files
    #[arg(long, short)]
    quiet: bool,
}

/// The pipeline files a path stands for: itself, or the YAML files in a folder, sorted.
pub fn pipeline_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let p = entry?.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The name a file gives a pipeline that has no `name:`: its stem.
pub fn default_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Reads and loads one file; an unreadable file is a diagnostic too.
pub fn load_file(path: &Path) -> (String, Result<pipeline::Pipeline, Vec<Diagnostic>>) {
    match std::fs::read(path) {
        Err(e) => (String::new(), Err(vec![Diagnostic::new(Pos::new(1, 1), format!("cannot read the file: {e}"))])),
        Ok(bytes) => match String::from_utf8(bytes) {
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let text = String::from_utf8_lossy(&e.into_bytes()[..at]).into_owned();
                let line = text.matches('\n').count() as u32 + 1;
                let col = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u32 + 1;
                (text, Err(vec![Diagnostic::new(Pos::new(line, col), "the file is not valid UTF-8")]))
            }
            Ok(text) => {
                let loaded = pipeline::load(&text, &default_name(path));
                (text, loaded)
            }
        },
    }
}

pub fn main(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in &args.paths {
        if !p.exists() {
            anyhow::bail!("{} does not exist", p.display());
        }
        files.extend(pipeline_files(p)?);
    }
    if files.is_empty() {
        anyhow::bail!("no pipeline files (*.yml, *.yaml) in {}", args.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut bad, mut problems) = (0usize, 0usize);
    for file in &files {
        let shown = file.display().to_string();
        let (text, loaded) = load_file(file);
        match loaded {
            Ok(p) => {
                if !args.quiet {
                    writeln!(out, "{shown}: ok ({}, {} steps)", p.name, p.steps.len() + p.finally.len())?;
                }
            }
            Err(diags) => {
                bad += 1;
                problems += diags.len();
                write!(out, "{}", Report { file: &shown, source: &text, diagnostics: &diags })?;
            }
        }
    }
    if bad > 0 {
        writeln!(out, "{bad} of {} files invalid, {problems} problems", files.len())?;
    } else if !args.quiet {
        writeln!(out, "{} files valid", files.len())?;
    }
    out.flush()?;
    Ok(if bad > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
