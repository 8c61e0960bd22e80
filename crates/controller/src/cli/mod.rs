//! `hilctl`: the command-line client of the REST API. The subcommands live here as a
//! library so the binary can add more (e.g. `demo`) by flattening [`Command`].

use crate::client::{Client, ClientError};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Controller base URL.
    #[arg(
        long,
        env = "HIL_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Bearer token (read-only or operator).
    #[arg(long, env = "HIL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Submit a campaign file; prints its id and list hash.
    Submit {
        file: PathBuf,
        /// Follow progress until the campaign finishes.
        #[arg(long)]
        watch: bool,
    },
    /// List campaigns.
    List,
    /// Show one campaign's state and progress.
    Status {
        id: u64,
    },
    /// Live progress bar and outcome counts until the campaign finishes.
    Watch {
        id: u64,
    },
    Pause {
        id: u64,
    },
    Resume {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    /// Boards with connectivity, state and health.
    Boards,
    /// Per-stratum report.
    Report {
        id: u64,
        #[arg(long, default_value = "table", value_parser = ["table", "json", "csv"])]
        format: String,
    },
    /// Per-inference records.
    Export {
        id: u64,
        #[arg(long, default_value = "csv", value_parser = ["csv", "jsonl", "parquet"])]
        format: String,
        /// Output file (stdout if omitted; required for parquet).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Usage(String),
}

pub async fn run(g: &Global, cmd: Command) -> Result<(), CliError> {
    let c = Client::new(&g.url, g.token.clone());
    match cmd {
        Command::Submit { file, watch: w } => {
            let yaml = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Io(file.display().to_string(), e))?;
            let v = c.submit(&file.display().to_string(), yaml).await?;
            println!(
                "campaign {} submitted: {} trials in {} strata, list hash {}",
                v["id"],
                v["trials"],
                v["strata"],
                v["hash"].as_str().unwrap_or("")
            );
            if w && let Some(id) = v["id"].as_u64() {
                watch(&c, id).await?;
            }
        }
        Command::List => {
            let v = c.json("GET", "/api/campaigns", None).await?;
            println!(
                "{:>4}  {:<24} {:<10} {:>9} {:>9}  hash",
                "id", "name", "state", "done", "trials"
            );
            for x in v.as_array().into_iter().flatten() {
                println!(
                    "{:>4}  {:<24} {:<10} {:>9} {:>9}  {}",
                    x["id"],
                    x["name"].as_str().unwrap_or(""),
                    x["state"].as_str().unwrap_or(""),
                    x["done"]
                        .as_u64()
                        .map(|d| d.to_string())
                        .unwrap_or("-".into()),
                    x["trials"],
                    &x["hash"].as_str().unwrap_or("")
                        [..12.min(x["hash"].as_str().unwrap_or("").len())]
                );
            }
        }
        Command::Status { id } => {
            let v = c.json("GET", &format!("/api/campaigns/{id}"), None).await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Command::Watch { id } => {
            watch(&c, id).await?;
        }
        Command::Pause { id } | Command::Resume { id } | Command::Cancel { id } => {
            let action = match cmd {
                Command::Pause { .. } => "pause",
                Command::Resume { .. } => "resume",
                _ => "cancel",
            };
            let v = c
                .json("POST", &format!("/api/campaigns/{id}/{action}"), None)
                .await?;
            println!("campaign {id}: {}", v["state"].as_str().unwrap_or("?"));
        }
        Command::Boards => {
            let v = c.json("GET", "/api/boards", None).await?;
            println!(
                "{:<14} {:<8} {:<11} {:<12} {:>7} {:>7}  reason",
                "board", "link", "state", "health", "power", "temp"
            );
            for b in v.as_array().into_iter().flatten() {
                let temp = b["temps_c"]
                    .as_array()
                    .and_then(|t| t.first())
                    .and_then(|t| t[1].as_f64())
                    .map(|t| format!("{t:.1}C"))
                    .unwrap_or("-".into());
                println!(
                    "{:<14} {:<8} {:<11} {:<12} {:>7} {:>7}  {}",
                    b["id"].as_str().unwrap_or(""),
                    b["connectivity"].as_str().unwrap_or(""),
                    b["state"].as_str().unwrap_or(""),
                    b["health"].as_str().unwrap_or(""),
                    b["power_w"]
                        .as_f64()
                        .map(|p| format!("{p:.2}W"))
                        .unwrap_or("-".into()),
                    temp,
                    b["health_reason"].as_str().unwrap_or("")
                );
            }
        }
        Command::Report { id, format } => {
            let b = c
                .call(
                    "GET",
                    &format!("/api/campaigns/{id}/report?format={format}"),
                    None,
                )
                .await?;
            print!("{}", String::from_utf8_lossy(&b));
        }
        Command::Export { id, format, output } => {
            if format == "parquet" && output.is_none() {
                return Err(CliError::Usage("--format parquet needs -o FILE".into()));
            }
            let b = c
                .call(
                    "GET",
                    &format!("/api/campaigns/{id}/export?format={format}"),
                    None,
                )
                .await?;
            match output {
                Some(p) => {
                    std::fs::write(&p, &b).map_err(|e| CliError::Io(p.display().to_string(), e))?;
                    eprintln!("wrote {} bytes to {}", b.len(), p.display());
                }
                None => {
                    use std::io::Write;
                    std::io::stdout()
                        .write_all(&b)
                        .map_err(|e| CliError::Io("stdout".into(), e))?;
                }
            }
        }
    }
    Ok(())
}

/// Follows a campaign with a progress bar until it finishes; returns its final state.
pub async fn watch(c: &Client, id: u64) -> Result<String, CliError> {
    let pb = ProgressBar::new(1);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} trials {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let v = c.json("GET", &format!("/api/campaigns/{id}"), None).await?;
        let state = v["state"].as_str().unwrap_or("?").to_string();
        if let Some(live) = v.get("live").filter(|l| !l.is_null()) {
            pb.set_length(live["planned"].as_u64().unwrap_or(1).max(1));
            pb.set_position(live["done"].as_u64().unwrap_or(0));
            let outcomes: Vec<String> = live["inference_outcomes"]
                .as_object()
                .map(|o| o.iter().map(|(k, n)| format!("{k}={n}")).collect())
                .unwrap_or_default();
            let boards = live["boards"].as_array().map(|b| b.len()).unwrap_or(0);
            pb.set_message(format!(
                "{state} on {boards} boards | {}",
                outcomes.join(" ")
            ));
        }
        if matches!(state.as_str(), "done" | "cancelled" | "timed_out") {
            pb.finish_with_message(state.clone());
            return Ok(state);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
