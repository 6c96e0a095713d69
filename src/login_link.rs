//! Credentials for whoever can read the data folder (or, distributed, holds the server's Redis
//! credential): `skiff login-link` (a one-time sign-in link for the web UI) and `skiff token`
//! (an API token for scripts and `skiff trigger`).

use std::process::ExitCode;

use crate::DataArgs;

#[derive(clap::Args, Debug)]
pub struct LoginLinkArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    redis: crate::redis_args::RedisArgs,
    /// The URL the server is reached at (default: the URL of the server last started on the
    /// data folder, else http://127.0.0.1:8080)
    #[arg(long, env = "SKIFF_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// A name for the token (shown under Settings, where it can be revoked)
    #[arg(value_name = "NAME")]
    name: String,
    /// What it may do: read (pipelines, runs, logs), run (also start, cancel, rerun), admin
    /// (also manage tokens)
    #[arg(long, default_value = "run", value_parser = ["read", "run", "admin"])]
    scope: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    redis: crate::redis_args::RedisArgs,
}

/// Where the credentials are: the data folder's Store, or Redis (with `--redis`); and the data
/// folder, when it is one.
async fn credentials(
    data: &DataArgs,
    redis: &crate::redis_args::RedisArgs,
) -> anyhow::Result<(
    std::sync::Arc<dyn skiff_core::store::AuthStore>,
    Option<std::path::PathBuf>,
)> {
    match redis.resolve()? {
        Some(redis) => Ok((
            std::sync::Arc::new(crate::distributed::open_store(&redis).await?),
            None,
        )),
        None => {
            let data = existing_store(data).await?;
            Ok((std::sync::Arc::new(data.store.clone()), Some(data.dir)))
        }
    }
}

/// The data folder's Store, which must exist already (a folder with no skiff data is more
/// likely a mistyped path than a wish for a new one).
async fn existing_store(data: &DataArgs) -> anyhow::Result<crate::Data> {
    anyhow::ensure!(
        data.exists(),
        "no skiff data in {} (start `skiff serve` first, or pass --data)",
        data.data.display()
    );
    data.open().await
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn main(args: LoginLinkArgs) -> anyhow::Result<ExitCode> {
    current_thread()?.block_on(async {
        let (auth, dir) = credentials(&args.data, &args.redis).await?;
        let token = skiff_server::auth::issue_login_link(auth.as_ref()).await?;
        let base = args
            .public_url
            .or_else(|| dir.as_deref().and_then(crate::read_server_url))
            .unwrap_or_else(|| "http://127.0.0.1:8080".to_string());
        println!("{}/login/link/{token}", base.trim_end_matches('/'));
        eprintln!(
            "(valid {} minutes, once)",
            skiff_server::auth::LOGIN_LINK_MINUTES
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    current_thread()?.block_on(async {
        let name = skiff_server::api::check_token_name(&args.name)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let scope: skiff_core::store::Scope =
            args.scope.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let (auth, _) = credentials(&args.data, &args.redis).await?;
        let secret = skiff_server::auth::random_token("skiff_");
        auth.create_token(&name, &skiff_server::auth::hash_secret(&secret), scope)
            .await?;
        println!("{secret}");
        eprintln!(
            "(an API token named `{name}` with scope `{}`; it is shown once, and can be revoked under Settings)",
            scope.as_str()
        );
        Ok(ExitCode::SUCCESS)
    })
}
