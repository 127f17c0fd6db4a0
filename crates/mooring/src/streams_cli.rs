//! `mooring streams`: operator tools for the stream manager. They talk to a running server
//! over the stream manager port with the same protocol the Greengrass SDKs use (so they see
//! exactly what an SDK client sees and never touch the files of a live store), finding the
//! port in `DATA_DIR/endpoints.json` unless `--server` names it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use mooring_streams::client::Client;

#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// List the stream names, one per line, sorted.
    Ls(StreamsConnectArgs),
    /// Print a stream's definition, storage status and export statuses as JSON
    /// (DescribeMessageStream's messageStreamInfo).
    #[command(alias = "describe")]
    Show(StreamsShowArgs),
    /// Print messages, one per line: JSON {"streamName","sequenceNumber","ingestTime",
    /// "payload" (base64)} by default, or the payload alone with --format text|raw.
    Read(StreamsReadArgs),
    /// Append one message (from --data, or the whole of standard input) and print its
    /// sequence number.
    Append(StreamsAppendArgs),
}

/// Where the stream manager is.
#[derive(Debug, Args, Clone)]
pub struct StreamsConnectArgs {
    /// The stream manager address, e.g. 127.0.0.1:8088 [default: the `stream_manager`
    /// address in DATA_DIR/endpoints.json, else 127.0.0.1:8088].
    #[arg(long, value_name = "ADDR")]
    pub server: Option<String>,
    /// The server's data directory, used to find endpoints.json.
    #[arg(
        long,
        default_value = "./mooring-data",
        value_name = "DIR",
        env = "MOORING_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// Token for servers that require authentication (stream_manager.require_auth).
    #[arg(long, value_name = "TOKEN", env = "AWS_CONTAINER_AUTHORIZATION_TOKEN")]
    pub auth_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct StreamsShowArgs {
    /// The stream name.
    pub name: String,
    #[command(flatten)]
    pub connect: StreamsConnectArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadFormat {
    /// One JSON object per message, payload in base64.
    Json,
    /// The payload as text (invalid UTF-8 replaced), one message per line.
    Text,
    /// The payload bytes back to back, nothing else.
    Raw,
}

#[derive(Debug, Args)]
pub struct StreamsReadArgs {
    /// The stream name.
    pub name: String,
    /// First sequence number to read [default: the oldest message kept].
    #[arg(long, value_name = "N")]
    pub from: Option<i64>,
    /// Read at most this many messages [default: everything up to the newest].
    #[arg(long, value_name = "K")]
    pub count: Option<i64>,
    /// Keep waiting for new messages instead of stopping at the newest.
    #[arg(long)]
    pub follow: bool,
    #[arg(long, value_enum, default_value = "json")]
    pub format: ReadFormat,
    #[command(flatten)]
    pub connect: StreamsConnectArgs,
}

#[derive(Debug, Args)]
pub struct StreamsAppendArgs {
    /// The stream name.
    pub name: String,
    /// The message; standard input when absent.
    #[arg(long, value_name = "TEXT")]
    pub data: Option<String>,
    #[command(flatten)]
    pub connect: StreamsConnectArgs,
}

/// The stream manager address from endpoints.json, if the server wrote one.
fn address_from(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("endpoints.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["stream_manager"].as_str().map(str::to_string)
}

async fn connect(args: &StreamsConnectArgs) -> Result<Client> {
    let address = args
        .server
        .clone()
        .or_else(|| address_from(&args.data_dir))
        .unwrap_or_else(|| "127.0.0.1:8088".to_string());
    Client::connect(&address, args.auth_token.as_deref()).await
}

/// Messages fetched per request.
const PAGE: i64 = 100;

pub async fn run(command: StreamsCommand, out: &mut impl Write) -> Result<()> {
    match command {
        StreamsCommand::Ls(args) => {
            let mut client = connect(&args).await?;
            let mut names = client.list().await?;
            names.sort();
            for name in names {
                writeln!(out, "{name}")?;
            }
        }
        StreamsCommand::Show(args) => {
            let mut client = connect(&args.connect).await?;
            let info = client.describe(&args.name).await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
        }
        StreamsCommand::Append(args) => {
            let payload = match args.data {
                Some(text) => text.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the message from standard input")?;
                    buf
                }
            };
            let mut client = connect(&args.connect).await?;
            let sequence_number = client.append(&args.name, payload).await?;
            writeln!(out, "{sequence_number}")?;
        }
        StreamsCommand::Read(args) => read(args, out).await?,
    }
    out.flush()?;
    Ok(())
}

async fn read(args: StreamsReadArgs, out: &mut impl Write) -> Result<()> {
    if matches!(args.count, Some(c) if c < 1) {
        bail!("--count must be at least 1");
    }
    let mut client = connect(&args.connect).await?;
    let info = client.describe(&args.name).await?;
    let oldest = info["storageStatus"]["oldestSequenceNumber"]
        .as_i64()
        .unwrap_or(0);
    let mut next = args.from.unwrap_or(oldest);
    if next < oldest {
        bail!("--from {next} is older than the oldest message kept ({oldest})");
    }
    let mut remaining = args.count.unwrap_or(i64::MAX);
    while remaining > 0 {
        // Without --follow, stop at the newest message; with it, wait for more.
        let timeout = if args.follow { 60_000 } else { 0 };
        let messages = client
            .read(&args.name, next, remaining.min(PAGE), timeout)
            .await?;
        if messages.is_empty() {
            if args.follow {
                continue;
            }
            break;
        }
        for message in &messages {
            match args.format {
                ReadFormat::Json => {
                    let line = serde_json::json!({
                        "streamName": args.name,
                        "sequenceNumber": message.sequence_number,
                        "ingestTime": message.ingest_time,
                        "payload": base64::engine::general_purpose::STANDARD.encode(&message.payload),
                    });
                    writeln!(out, "{line}")?;
                }
                ReadFormat::Text => writeln!(out, "{}", String::from_utf8_lossy(&message.payload))?,
                ReadFormat::Raw => out.write_all(&message.payload)?,
            }
            next = message.sequence_number + 1;
            remaining -= 1;
        }
        out.flush()?;
    }
    Ok(())
}
