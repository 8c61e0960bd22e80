//! hil-controller: the lab's controller daemon.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "KV260 robustness lab controller: campaigns, boards, results, metrics"
)]
struct Args {
    /// Controller YAML configuration.
    #[arg(short, long, env = "HIL_CONTROLLER_CONFIG")]
    config: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = controller::config::Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(controller::server::run(cfg, None))?;
    Ok(())
}
