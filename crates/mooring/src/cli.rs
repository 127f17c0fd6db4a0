//! Command-line interface: subcommands, their flags, and the small ones (`init`, `status`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mooring_core::config::DEFAULT_CONFIG_TOML;
use mooring_core::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Mooring: a self-hosted, AWS-compatible IoT backend in one binary.
///
/// One process serves an MQTT broker with AWS IoT Core semantics, the IoT rules engine,
/// IoT Jobs, the Greengrass stream manager, Kinesis Video Streams and an EventBridge-style
/// event bus, reachable with the official AWS SDKs and CLIs via --endpoint-url.
#[derive(Debug, Parser)]
#[command(name = "mooring", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start every listener (HTTP APIs, MQTT, MQTTS, stream manager) and serve until
    /// SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Write a commented default configuration file.
    Init(InitArgs),
    /// Ask a running server for its health and endpoints.
    Status(StatusArgs),
    /// Event bus tools.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Stream manager tools: ls, show, read, append (over the stream manager port).
    #[command(subcommand)]
    Streams(crate::streams_cli::StreamsCommand),
    /// Kinesis Video Streams producer and consumer: put (PutMedia), get (GetMedia).
    #[command(subcommand)]
    Video(crate::video_cli::VideoCommand),
    /// IoT Jobs: list jobs or show one, with per-status execution counts.
    #[command(subcommand)]
    Jobs(JobsCommand),
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// One line per job with its status and per-status execution counts.
    Ls(JobsArgs),
    /// One job, its counts and every thing's execution.
    Show(JobsShowArgs),
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The server's data directory.
    #[arg(
        long,
        default_value = "./mooring-data",
        value_name = "DIR",
        env = "MOORING_DATA_DIR"
    )]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct JobsShowArgs {
    /// The job id.
    pub job_id: String,
    #[command(flatten)]
    pub data: JobsArgs,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print the events arriving on a bus (one JSON document per line) until interrupted.
    Tail(EventsTailArgs),
}

#[derive(Debug, Args)]
pub struct EventsTailArgs {
    /// The bus name.
    #[arg(default_value = "default")]
    pub bus: String,
    /// The server's data directory.
    #[arg(
        long,
        default_value = "./mooring-data",
        value_name = "DIR",
        env = "MOORING_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// Start with the oldest event kept instead of the next new one.
    #[arg(long)]
    pub from_start: bool,
    /// Print what is there and exit instead of following.
    #[arg(long)]
    pub no_follow: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Flags that build the configuration. Precedence, weakest first: the file given with
/// --config, MOORING_* environment variables, these flags.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file (see `mooring init`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for all state [default: ./mooring-data; env: MOORING_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listener for every AWS API, /health, /metrics and MQTT over WebSocket
    /// [default: 127.0.0.1:4566].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Plain-TCP MQTT listener; "" disables it [default: 127.0.0.1:1883].
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<String>,
    /// MQTT over TLS listener; "" disables it [default: 127.0.0.1:8883].
    #[arg(long, value_name = "ADDR")]
    pub mqtts_listen: Option<String>,
    /// Greengrass stream manager listener; "" disables it [default: 127.0.0.1:8088].
    #[arg(long, value_name = "ADDR")]
    pub stream_manager_listen: Option<String>,
    /// Request authentication: "sigv4" or "none" (development only) [default: sigv4].
    #[arg(long, value_name = "MODE")]
    pub auth: Option<String>,
    /// Account id used in ARNs [default: 000000000000].
    #[arg(long, value_name = "ID")]
    pub account_id: Option<String>,
    /// Region used in ARNs and endpoints [default: us-east-1].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Log format: "human" or "json" [default: human].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. "info" or "debug,hyper=info" [default: info; RUST_LOG wins].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Set any configuration key, e.g. --set events.max_entry_bytes=1048576 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// Merges file, environment and these flags into the configuration.
    pub fn load(&self) -> Result<Config> {
        let mut flags: Vec<(String, String)> = Vec::new();
        let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
        if let Some(dir) = &self.data_dir {
            flags.push(("data_dir".into(), quoted(&dir.to_string_lossy())));
        }
        let strings = [
            ("http.listen", &self.http_listen),
            ("mqtt.listen", &self.mqtt_listen),
            ("mqtt.tls_listen", &self.mqtts_listen),
            ("stream_manager.listen", &self.stream_manager_listen),
            ("http.auth", &self.auth),
            ("account_id", &self.account_id),
            ("region", &self.region),
            ("log_format", &self.log_format),
            ("log_level", &self.log_level),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                flags.push((key.into(), quoted(v)));
            }
        }
        for item in &self.set {
            let Some((key, value)) = item.split_once('=') else {
                bail!("--set takes KEY=VALUE, got {item:?}");
            };
            flags.push((key.trim().to_string(), value.to_string()));
        }
        Config::load(self.config.as_deref(), std::env::vars(), &flags)
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write the configuration.
    #[arg(long, default_value = "mooring.toml", value_name = "FILE")]
    pub config: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

pub fn init(args: &InitArgs) -> Result<()> {
    if args.config.exists() && !args.force {
        bail!(
            "{} exists; pass --force to overwrite it",
            args.config.display()
        );
    }
    std::fs::write(&args.config, DEFAULT_CONFIG_TOML)
        .with_context(|| format!("writing {}", args.config.display()))?;
    println!(
        "Wrote {}. Start with: mooring serve --config {}",
        args.config.display(),
        args.config.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Address of the HTTP listener.
    #[arg(long, default_value = "127.0.0.1:4566", value_name = "ADDR")]
    pub http: String,
}

/// Fetches `/health` with a minimal HTTP/1.1 exchange and prints it.
pub async fn status(args: &StatusArgs) -> Result<()> {
    let mut stream = tokio::net::TcpStream::connect(&args.http)
        .await
        .with_context(|| format!("no Mooring answering at {}", args.http))?;
    stream
        .write_all(
            format!(
                "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                args.http
            )
            .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unhealthy: {}", head.lines().next().unwrap_or(""));
    }
    println!("{body}");
    Ok(())
}
