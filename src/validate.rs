//! `skiff validate`: load pipeline files and print every diagnostic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use skiff_core::catalog::{self, load_file_with};
use skiff_core::diag::Report;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Pipeline files, or folders whose *.yml and *.yaml files are checked
    #[arg(value_name = "PATH", default_value = "pipelines")]
    paths: Vec<PathBuf>,
    /// Print nothing for valid files
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    config: crate::ConfigArgs,
}

/// The pipeline files a path stands for: itself, or the YAML files in a folder, sorted.
fn pipeline_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    catalog::pipeline_files(path).with_context(|| format!("reading {}", path.display()))
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
        anyhow::bail!(
            "no pipeline files (*.yml, *.yaml) in {}",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let options = args.config.read()?.load_options();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut bad, mut problems) = (0usize, 0usize);
    let mut loaded: Vec<(String, String, Result<_, Vec<_>>)> = files
        .iter()
        .map(|file| {
            let (text, result) = load_file_with(file, &options);
            (file.display().to_string(), text, result)
        })
        .collect();
    // What only shows across files: pipelines sharing a hook must name one secret.
    let across = {
        let mut valid: Vec<(usize, &str, &skiff_core::pipeline::Pipeline)> = loaded
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, r))| r.as_ref().ok().map(|p| (i, p.name.as_str(), p)))
            .collect();
        valid.sort_by(|a, b| a.1.cmp(b.1));
        let named: Vec<(&str, &skiff_core::pipeline::Pipeline)> =
            valid.iter().map(|(_, n, p)| (*n, *p)).collect();
        catalog::shared_hook_problems(&named)
            .into_iter()
            .map(|(i, d)| (valid[i].0, d))
            .collect::<Vec<_>>()
    };
    for (i, d) in across {
        if let Some(entry) = loaded.get_mut(i) {
            entry.2 = Err(vec![d]);
        }
    }
    for (shown, text, result) in &loaded {
        match result {
            Ok(p) => {
                if !args.quiet {
                    writeln!(
                        out,
                        "{shown}: ok ({}, {} steps)",
                        p.name,
                        p.steps.len() + p.finally.len()
                    )?;
                }
            }
            Err(diags) => {
                bad += 1;
                problems += diags.len();
                write!(
                    out,
                    "{}",
                    Report {
                        file: shown,
                        source: text,
                        diagnostics: diags
                    }
                )?;
            }
        }
    }
    if bad > 0 {
        writeln!(
            out,
            "{bad} of {} files invalid, {}",
            files.len(),
            skiff_core::diag::problems(problems)
        )?;
    } else if !args.quiet {
        writeln!(out, "{} files valid", files.len())?;
    }
    out.flush()?;
    Ok(if bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
