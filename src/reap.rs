//! `skiff reap [--dry-run]`: removes from the local Docker engine what runs created and nobody
//! keeps, deciding from the resources ledger of the data folder (see `skiff_worker::reap`).

use std::process::ExitCode;

use crate::DataArgs;

#[derive(clap::Args, Debug)]
pub struct ReapArgs {
    /// Only say what would be removed
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    data: DataArgs,
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
        let data = args.data.open().await?;
        let engine = skiff_docker::Engine::local()
            .await
            .map_err(anyhow::Error::msg)?;
        let reaped = skiff_worker::reap::reap(&data.store, &engine, args.dry_run)
            .await
            .map_err(anyhow::Error::msg)?;
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for r in &reaped {
            let gone = if r.existed { "" } else { " (already gone)" };
            println!("{verb} {} {}{gone}: {}", r.kind, r.name, r.why);
        }
        if reaped.is_empty() {
            println!("nothing to reap on {}", engine.endpoint);
        }
        Ok(ExitCode::SUCCESS)
    })
}
