//! `mooring serve`: first-start setup, wiring of every service, the listeners, and
//! graceful shutdown.
//!
//! Start-up creates the data directory, the credentials and the CA when they are missing,
//! opens the metadata database, builds the [`ServiceContext`], constructs the services and
//! registers their AWS APIs with the front door, binds every listener, writes the endpoints
//! file and prints the banner. SIGINT or SIGTERM triggers the shared shutdown: listeners stop
//! accepting, in-flight requests finish, tracked background tasks drain, and the process
//! exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mooring_aws::{AwsService, FrontDoor, FrontDoorConfig};
use mooring_core::config::{AuthMode, LogFormat};
use mooring_core::credentials::Credentials;
use mooring_core::handles::ServiceHandles;
use mooring_core::metrics::Metrics;
use mooring_core::pki::CertificateAuthority;
use mooring_core::{Arns, Config, Db, ServiceContext, Shutdown, SystemClock};
use tokio::net::TcpListener;

use crate::banner::{self, Endpoints};

/// Sets up `tracing` from the configuration; `RUST_LOG` overrides `log_level`.
pub fn init_logging(config: &Config) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log_level))
        .context("invalid log_level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

#[derive(Clone)]
struct HttpState {
    front_door: FrontDoor,
    metrics: Metrics,
    endpoints: Arc<std::sync::OnceLock<Endpoints>>,
    services: Arc<Vec<&'static str>>,
}

pub async fn serve(config: Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let configured = (!config.http.access_key_id.is_empty()).then(|| Credentials {
        access_key_id: config.http.access_key_id.clone(),
        secret_access_key: config.http.secret_access_key.clone(),
        session_token: None,
    });
    let (mut credentials, fresh_credentials) = Credentials::load_or_create(&data_dir, configured)?;
    if !config.http.session_token.is_empty() {
        credentials.session_token = Some(config.http.session_token.clone());
    }
    let (ca, fresh_ca) = CertificateAuthority::load_or_create(&data_dir)?;
    if fresh_credentials || fresh_ca {
        tracing::info!(data_dir = %data_dir.display(), "first start: created credentials and certificate authority");
    }
    let db = Db::open(&data_dir.join("metadata.db")).context("opening the metadata store")?;
    let shutdown = Shutdown::new();
    let metrics = Metrics::new();
    let ctx = ServiceContext {
        arns: Arns::new(config.account_id.clone(), config.region.clone()),
        config: Arc::new(config.clone()),
        data_dir: data_dir.clone(),
        db,
        clock: Arc::new(SystemClock),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        handles: ServiceHandles::new(),
        ca: Arc::new(ca),
    };

    let broker = mooring_mqtt::start(&ctx)?;
    let stream_manager = mooring_streams::StreamManagerService::start(&ctx)
        .context("starting the stream manager")?;
    let iot = mooring_iot::Iot::start(&ctx).context("starting the IoT rules engine")?;
    mooring_iot::broker_bridge::connect(&broker, iot.engine.clone());
    iot.security.install(&broker);
    iot.jobs.attach_broker(&broker)?;
    iot.shadows.attach_broker(&broker)?;
    let services: Vec<Arc<dyn AwsService>> = vec![
        iot.service.clone(),
        iot.jobs_data.clone(),
        iot.shadow_data.clone(),
        mooring_video::VideoService::new(&ctx)?,
        mooring_events::EventsService::start(&ctx).context("starting the event bus")?,
        mooring_iot::iot_data::IotDataService::new(&ctx, broker.clone())?,
        Arc::new(mooring_mqtt::websocket::MqttOverWebSocket::new(
            broker.clone(),
        )),
    ];
    let service_names = services.iter().map(|s| s.name()).collect::<Vec<_>>();
    let front_door = FrontDoor::new(
        FrontDoorConfig {
            auth: config.http.auth,
            credentials: credentials.clone(),
            region: config.region.clone(),
            max_body_bytes: config.http.max_body_bytes,
        },
        services,
        metrics.clone(),
        ctx.clock.clone(),
    );

    let http_listener = bind("http", &config.http.listen)
        .await?
        .context("http.listen must not be empty")?;
    let http_addr = http_listener.local_addr()?;
    let mqtt_listener = bind("mqtt", &config.mqtt.listen).await?;
    let mqtts_listener = bind("mqtts", &config.mqtt.tls_listen).await?;
    let stream_manager_listener = bind("stream_manager", &config.stream_manager.listen).await?;
    let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let endpoints = Endpoints::new(
        &config,
        http_addr,
        local(&mqtt_listener),
        local(&mqtts_listener),
        local(&stream_manager_listener),
        &data_dir,
    );
    credentials.write_files(&data_dir, &config.region, &endpoints.http_url)?;

    let state = HttpState {
        front_door,
        metrics,
        endpoints: Arc::new(std::sync::OnceLock::new()),
        services: Arc::new(service_names),
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(aws)
        .with_state(state.clone());

    if let Some(listener) = mqtt_listener {
        shutdown.spawn(mooring_mqtt::listener::serve_tcp(broker.clone(), listener));
    }
    if let Some(listener) = mqtts_listener {
        let acceptor = mooring_mqtt::listener::tls_acceptor(&ctx.ca)?;
        shutdown.spawn(mooring_mqtt::listener::serve_tls(
            broker.clone(),
            listener,
            acceptor,
        ));
    }
    if let Some(listener) = stream_manager_listener {
        shutdown.spawn(stream_manager.serve(listener));
    }

    // Signal handlers are registered before the endpoints file tells anyone we are up, so a
    // SIGTERM right after start still shuts down gracefully.
    let signals = wait_for_signal()?;
    let signal_shutdown = shutdown.clone();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("shutdown requested; draining");
        signal_shutdown.trigger();
    });

    let _ = state.endpoints.set(endpoints.clone());
    endpoints.write(&data_dir)?;
    println!(
        "{}",
        banner::render(&endpoints, &credentials, config.http.auth == AuthMode::None)
    );
    if config.http.auth == AuthMode::None {
        tracing::warn!("auth = \"none\": HTTP requests are not authenticated");
    }

    let http_shutdown = shutdown.clone();
    axum::serve(
        http_listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { http_shutdown.triggered().await })
    .await
    .context("HTTP server failed")?;
    if !shutdown.drain(Duration::from_secs(10)).await {
        tracing::warn!("some tasks did not finish within 10 s of shutdown");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn bind(name: &str, addr: &str) -> Result<Option<TcpListener>> {
    if addr.trim().is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} listener to {addr}"))?;
    Ok(Some(listener))
}

/// Registers SIGINT and SIGTERM now; the returned future resolves on the first of them.
fn wait_for_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

async fn health(State(state): State<HttpState>) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "services": *state.services,
        "endpoints": state.endpoints.get(),
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn metrics_text(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn aws(State(state): State<HttpState>, request: Request<Body>) -> Response {
    state.front_door.handle(request).await
}
