//! `mooring video put` and `mooring video get`: a producer and a consumer for Kinesis Video
//! Streams, speaking to Mooring (or AWS) exactly as the producer SDKs and boto3 do.
//!
//! `put` streams an MKV file or standard input (for example
//! `ffmpeg … -f matroska -live 1 - | mooring video put cam1 -`) to PutMedia as a chunked
//! body signed with SigV4 (`UNSIGNED-PAYLOAD`), and prints every acknowledgement line as it
//! arrives. `get` calls GetMedia with a start selector and writes the returned MKV stream to
//! a file or standard output. The endpoint, region and credentials come from the server's
//! data directory (`endpoints.json` and the `mooring` profile in `credentials`) unless
//! given as flags.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mooring_core::credentials::{credentials_path, Credentials};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Subcommand)]
pub enum VideoCommand {
    /// Stream MKV to PutMedia and print the acknowledgements (one JSON object per line).
    /// Exits 1 if any ERROR acknowledgement came back.
    Put(VideoPutArgs),
    /// Write the GetMedia output of a stream (MKV chunks) to a file.
    Get(VideoGetArgs),
}

/// Where the server is and who we are.
#[derive(Debug, Args, Clone)]
pub struct VideoConnectArgs {
    /// The data endpoint, e.g. http://127.0.0.1:4566 [default: `http_url` in
    /// DATA_DIR/endpoints.json, else http://127.0.0.1:4566].
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// The server's data directory: endpoints.json, and the `mooring` profile in its
    /// credentials file.
    #[arg(
        long,
        default_value = "./mooring-data",
        value_name = "DIR",
        env = "MOORING_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// Region for signing [default: the server's, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Access key [default: the data directory's credentials; env AWS_ACCESS_KEY_ID].
    #[arg(long, value_name = "KEY", env = "AWS_ACCESS_KEY_ID")]
    pub access_key_id: Option<String>,
    #[arg(long, value_name = "SECRET", env = "AWS_SECRET_ACCESS_KEY")]
    pub secret_access_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct VideoPutArgs {
    /// The stream name, then the MKV file ("-" or nothing for standard input).
    /// With --stream, the only positional argument is the file.
    #[arg(value_name = "STREAM_OR_FILE", num_args = 0..=2)]
    pub positional: Vec<String>,
    /// The stream name (instead of the first positional argument).
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,
    /// x-amzn-fragment-timecode-type: ABSOLUTE or RELATIVE.
    #[arg(long, default_value = "ABSOLUTE", value_name = "TYPE")]
    pub timecode_type: String,
    /// x-amzn-producer-start-timestamp in seconds [default: now].
    #[arg(long, value_name = "SECONDS")]
    pub producer_start: Option<f64>,
    #[command(flatten)]
    pub connect: VideoConnectArgs,
}

#[derive(Debug, Args)]
pub struct VideoGetArgs {
    /// The stream name (or give --stream).
    #[arg(value_name = "STREAM")]
    pub name: Option<String>,
    /// The stream name.
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,
    /// Where to start: now, earliest, after:FRAGMENT_NUMBER, server:EPOCH_SECONDS,
    /// producer:EPOCH_SECONDS, or token:CONTINUATION_TOKEN (the StartSelectorType names also
    /// work, e.g. FRAGMENT_NUMBER:N, SERVER_TIMESTAMP:SECONDS, CONTINUATION_TOKEN:T).
    #[arg(long, default_value = "earliest", value_name = "SELECTOR")]
    pub start: String,
    /// Output file; "-" (the default) for standard output.
    #[arg(long, short, default_value = "-", value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub connect: VideoConnectArgs,
}

/// The endpoint, region and credentials to use.
struct Target {
    endpoint: String,
    region: String,
    credentials: Credentials,
}

fn target(args: &VideoConnectArgs) -> Result<Target> {
    let endpoints: serde_json::Value =
        std::fs::read_to_string(args.data_dir.join("endpoints.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
    let endpoint = args
        .endpoint_url
        .clone()
        .or_else(|| endpoints["http_url"].as_str().map(str::to_string))
        .unwrap_or_else(|| "http://127.0.0.1:4566".to_string());
    let region = args
        .region
        .clone()
        .or_else(|| endpoints["region"].as_str().map(str::to_string))
        .unwrap_or_else(|| "us-east-1".to_string());
    let credentials = match (&args.access_key_id, &args.secret_access_key) {
        (Some(key), Some(secret)) => Credentials {
            access_key_id: key.clone(),
            secret_access_key: secret.clone(),
            session_token: None,
        },
        _ => Credentials::read(&credentials_path(&args.data_dir))?.ok_or_else(|| {
            anyhow!(
                "no credentials: pass --access-key-id/--secret-access-key or a --data-dir with a credentials file"
            )
        })?,
    };
    Ok(Target {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        region,
        credentials,
    })
}

/// Signs `request` for `kinesisvideo`; `body` is the payload to hash, `None` for a streamed
/// body (`UNSIGNED-PAYLOAD`).
fn sign<B>(target: &Target, request: &mut http::Request<B>, body: Option<&[u8]>) -> Result<()> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
    };
    let identity = aws_credential_types::Credentials::new(
        &target.credentials.access_key_id,
        &target.credentials.secret_access_key,
        target.credentials.session_token.clone(),
        None,
        "mooring-cli",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&target.region)
        .name("kinesisvideo")
        .time(SystemTime::now())
        .settings(settings)
        .build()?
        .into();
    let uri = request.uri().to_string();
    let headers: Vec<(&str, &str)> = request
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let signable_body = match body {
        Some(bytes) => SignableBody::Bytes(bytes),
        None => SignableBody::UnsignedPayload,
    };
    let signable = SignableRequest::new(
        request.method().as_str(),
        &uri,
        headers.into_iter(),
        signable_body,
    )?;
    let (instructions, _) = sign(signable, &params)?.into_parts();
    instructions.apply_to_request_http1x(request);
    Ok(())
}

fn host_of(endpoint: &str) -> Result<String> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("bad endpoint {endpoint:?}"))?;
    uri.authority()
        .map(|a| a.to_string())
        .ok_or_else(|| anyhow!("endpoint {endpoint:?} has no host"))
}

/// The stream name and input of `put`.
fn put_inputs(args: &VideoPutArgs) -> Result<(String, String)> {
    let mut positional = args.positional.iter().cloned();
    let stream = match &args.stream {
        Some(s) => s.clone(),
        None => positional
            .next()
            .ok_or_else(|| anyhow!("give the stream name (or --stream NAME)"))?,
    };
    let file = positional.next().unwrap_or_else(|| "-".to_string());
    if positional.next().is_some() {
        bail!("too many arguments: STREAM [FILE|-], or --stream NAME [FILE|-]");
    }
    Ok((stream, file))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `put`; returns whether every acknowledgement was free of errors.
pub async fn put(args: &VideoPutArgs, out: &mut (impl std::io::Write + Send)) -> Result<bool> {
    let (stream, file) = put_inputs(args)?;
    let target = target(&args.connect)?;
    let mut input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("opening {file}"))?,
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match input.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e) as BoxError)).await;
                    return;
                }
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    let producer_start = args.producer_start.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    });
    let mut request = http::Request::post(format!("{}/putMedia", target.endpoint))
        .header("host", host_of(&target.endpoint)?)
        .header("x-amzn-stream-name", &stream)
        .header("x-amzn-fragment-timecode-type", &args.timecode_type)
        .header(
            "x-amzn-producer-start-timestamp",
            format!("{producer_start:.3}"),
        )
        .header("x-amzn-fragment-acknowledgment-required", "1")
        .header("connection", "keep-alive")
        .body(body)?;
    sign(&target, &mut request, None)?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request)
        .await
        .context("PutMedia request failed")?;
    let status = response.status();
    let error_type = aws_error_type(response.headers());
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        bail!(
            "PutMedia answered {status} {error_type}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let mut clean = true;
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if line.is_empty() {
                continue;
            }
            if line.contains("\"EventType\":\"ERROR\"") {
                clean = false;
            }
            writeln!(out, "{line}")?;
            out.flush()?;
        }
    }
    let rest = String::from_utf8_lossy(&pending).trim().to_string();
    if !rest.is_empty() {
        if rest.contains("\"EventType\":\"ERROR\"") {
            clean = false;
        }
        writeln!(out, "{rest}")?;
    }
    reader.abort();
    Ok(clean)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + Unpin {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// GetMedia's StartSelector for a `--start` value.
pub fn start_selector(start: &str) -> Result<serde_json::Value> {
    let (kind, value) = start.split_once(':').unwrap_or((start, ""));
    let number = |v: &str| -> Result<f64> {
        v.parse::<f64>()
            .with_context(|| format!("{v:?} is not a number of seconds"))
    };
    Ok(match kind.to_ascii_lowercase().as_str() {
        "now" => serde_json::json!({"StartSelectorType": "NOW"}),
        "earliest" => serde_json::json!({"StartSelectorType": "EARLIEST"}),
        "after" | "fragment" | "fragment_number" => serde_json::json!({
            "StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": value}),
        "server" | "server_timestamp" => serde_json::json!({
            "StartSelectorType": "SERVER_TIMESTAMP", "StartTimestamp": number(value)?}),
        "producer" | "producer_timestamp" => serde_json::json!({
            "StartSelectorType": "PRODUCER_TIMESTAMP", "StartTimestamp": number(value)?}),
        "token" | "continuation_token" => serde_json::json!({
            "StartSelectorType": "CONTINUATION_TOKEN", "ContinuationToken": value}),
        other => bail!(
            "unknown start {other:?}: use now, earliest, after:N, server:SECONDS, producer:SECONDS or token:T"
        ),
    })
}

/// Runs `get`; returns the number of bytes written.
pub async fn get(args: &VideoGetArgs) -> Result<u64> {
    let stream = args
        .stream
        .clone()
        .or_else(|| args.name.clone())
        .ok_or_else(|| anyhow!("give the stream name (or --stream NAME)"))?;
    let target = target(&args.connect)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "StreamName": stream,
        "StartSelector": start_selector(&args.start)?,
    }))?;
    let mut request = http::Request::post(format!("{}/getMedia", target.endpoint))
        .header("host", host_of(&target.endpoint)?)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.clone())))?;
    sign(&target, &mut request, Some(&body))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request)
        .await
        .context("GetMedia request failed")?;
    let status = response.status();
    let error_type = aws_error_type(response.headers());
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        bail!(
            "GetMedia answered {status} {error_type}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let mut output: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if args.out == Path::new("-") {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::File::create(&args.out)
                .await
                .with_context(|| format!("creating {}", args.out.display()))?,
        )
    };
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            output.write_all(&data).await?;
            written += data.len() as u64;
        }
    }
    output.flush().await?;
    Ok(written)
}

/// The AWS error type of a failed response (`x-amzn-ErrorType`, without botocore's `:…`
/// suffix), so the CLI names the exception a user would look up.
fn aws_error_type(headers: &hyper::HeaderMap) -> String {
    headers
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .map(|t| t.split(':').next().unwrap_or(t).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_selectors_match_the_api_shape() {
        assert_eq!(start_selector("now").unwrap()["StartSelectorType"], "NOW");
        let s = start_selector("after:91343852333181432392682062607743920146").unwrap();
        assert_eq!(s["StartSelectorType"], "FRAGMENT_NUMBER");
        assert_eq!(
            s["AfterFragmentNumber"],
            "91343852333181432392682062607743920146"
        );
        let s = start_selector("producer:1700000000.5").unwrap();
        assert_eq!(s["StartTimestamp"], 1700000000.5);
        let s = start_selector("CONTINUATION_TOKEN:123").unwrap();
        assert_eq!(s["StartSelectorType"], "CONTINUATION_TOKEN");
        assert_eq!(s["ContinuationToken"], "123");
        assert_eq!(
            start_selector("EARLIEST").unwrap()["StartSelectorType"],
            "EARLIEST"
        );
        assert!(start_selector("yesterday").is_err());
        assert!(start_selector("server:soon").is_err());
    }
}
