//! `skiff reap [--dry-run]`: removes from the local Docker engine, and from every remote engine
//! skiff's config declares, what runs created and nobody keeps, deciding from the resources
//! ledger of the data folder (see `skiff_worker::reap`).

use std::process::ExitCode;

use crate::DataArgs;

#[derive(clap::Args, Debug)]
pub struct ReapArgs {
    /// Only say what would be removed
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    config: crate::ConfigArgs,
}

pub fn main(args: ReapArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        anyhow::ensure!(
            args.data.exists(),
            "no skiff data in {} (pass --data)",
            args.data.data.display()
        );
        let config = args.config.read()?;
        let targets = skiff_worker::actions::engine_targets(&config).map_err(anyhow::Error::msg)?;
        // A declared engine out of reach fails the command (after the others are reaped); the
        // local one only when it is the only one to reap.
        let only_local = targets.is_empty();
        let data = args.data.open().await?;
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        // The local engine, then each declared one; one that cannot be reached is skipped (and
        // the exit status says so), the others are reaped.
        let (mut missed, mut reached) = (0, Vec::new());
        let hosts = std::iter::once(None).chain(targets.into_iter().map(Some));
        for declared in hosts {
            let (host, engine) = match declared {
                None => (
                    None,
                    skiff_docker::Engine::local()
                        .await
                        .map_err(|e| e.to_string()),
                ),
                Some((host, target)) => (
                    Some(host),
                    skiff_docker::Engine::connect(target)
                        .await
                        .map_err(|e| e.to_string()),
                ),
            };
            let on = host
                .as_deref()
                .map(|h| format!(" on {h}"))
                .unwrap_or_default();
            let engine = match engine {
                Ok(engine) => engine,
                Err(e) => {
                    let which = host.as_deref().unwrap_or("the local engine");
                    eprintln!("skiff reap: skipping {which}: {e}");
                    if host.is_some() || only_local {
                        missed += 1;
                    }
                    continue;
                }
            };
            // Two hosts can reach one engine (the local one among them).
            if reached.contains(&engine.id) {
                continue;
            }
            reached.push(engine.id.clone());
            let reaped = skiff_worker::reap::reap(&data.store, &engine, args.dry_run)
                .await
                .map_err(anyhow::Error::msg)?;
            for r in &reaped {
                let gone = if r.existed { "" } else { " (already gone)" };
                println!("{verb} {} {}{on}{gone}: {}", r.kind, r.name, r.why);
            }
            if reaped.is_empty() {
                println!("nothing to reap on {}", engine.endpoint);
            }
        }
        Ok(if missed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
