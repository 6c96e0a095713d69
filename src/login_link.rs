//! `skiff login-link`: issue a one-time sign-in link, for whoever can read the data folder.

use std::process::ExitCode;

use crate::DataArgs;

#[derive(clap::Args, Debug)]
pub struct LoginLinkArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The URL the server is reached at
    #[arg(
        long,
        env = "SKIFF_PUBLIC_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    public_url: String,
}

pub fn main(args: LoginLinkArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        anyhow::ensure!(
            args.data.db().exists(),
            "no skiff data in {} (start `skiff serve` first, or pass --data)",
            args.data.data.display()
        );
        let store = args.data.open_store().await?;
        let token = skiff_server::auth::issue_login_link(&store).await?;
        println!(
            "{}/login/link/{token}",
            args.public_url.trim_end_matches('/')
        );
        eprintln!(
            "(valid {} minutes, once)",
            skiff_server::auth::LOGIN_LINK_MINUTES
        );
        Ok(ExitCode::SUCCESS)
    })
}
