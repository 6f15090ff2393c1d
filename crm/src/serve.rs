//! `crm serve`: commands, projections and queries in one process on the
//! embedded SQLite store (or the PostgreSQL one named by `CRM_DATABASE_URL`),
//! on one HTTP port (plus, with `--grpc-addr`, the gRPC command and query
//! API), with graceful shutdown.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use std::sync::Arc;
use std::time::Duration;

use crm_command_service::{App, Executor, Tokens};
use crm_projection_service::all_projections;
use crm_projection_service::runner::{Runner, RunnerSettings};
use crm_query_service::{LiveSettings, QueryState};

use crate::secret::{self, SecretSource};
use crate::DataArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "CRM_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// Address of the gRPC API (commands and queries); off when unset.
    #[arg(long, env = "CRM_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Event log URL; by default the SQLite file `<data-dir>/crm.db`.
    #[arg(long, env = "CRM_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Log as JSON lines (production) instead of text.
    #[arg(long, env = "CRM_LOG_JSON", default_value_t = false)]
    log_json: bool,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let data_dir = &args.data.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let (secret, source) = secret::load_or_create(args.data.token_secret.as_deref(), data_dir)?;
    let tokens = Tokens::new(&secret)?;
    let (log, read_db) = crate::stores::open(data_dir, args.database_url.as_deref()).await?;
    let tokens = Arc::new(tokens);
    // Before the runner starts, so its first gauges and counters are kept.
    let metrics = crate::telemetry::metrics_routes(tokens.clone())?;
    let app = App {
        executor: Arc::new(Executor::new(log.clone())),
        tokens: tokens.clone(),
    };
    let runner = Runner::new(
        log.clone(),
        read_db.clone(),
        all_projections(),
        runner_settings(),
    );
    runner
        .install()
        .await
        .context("installing the projections")?;
    // One switch stops everything: HTTP (gracefully), live feeds and projection workers.
    let (shutdown, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = shutdown.send(true);
    });
    let projection_task = tokio::spawn(runner.run(stopping.clone()));
    tokio::spawn(crm_projection_service::status::report_progress(
        read_db.clone(),
        log.clone(),
        stopping.clone(),
    ));
    let live = LiveSettings {
        shutdown: Some(stopping.clone()),
        ..LiveSettings::default()
    };
    let queries = QueryState::new(log.clone(), tokens)
        .with_live(live)
        .with_read_models(read_db);
    let routes = crm_command_service::routes(app)
        .merge(crm_query_service::routes(queries))
        .merge(metrics)
        .merge(openapi_route());
    let router = crm_service_kit::http::stack(routes);
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let address = listener.local_addr()?;
    let grpc_task = match args.grpc_addr {
        Some(grpc_addr) => {
            let front = crate::grpc::Front::CommandsAndQueries;
            let (bound, task) =
                crate::grpc::spawn(grpc_addr, router.clone(), front, stopping.clone()).await?;
            println!("crm gRPC listening on http://{bound}");
            Some(task)
        }
        None => None,
    };
    tracing::info!(%address, data_dir = %data_dir.display(), "crm serving");
    if let SecretSource::GeneratedFile(path) = source {
        println!("generated a token secret in {}", path.display());
        println!(
            "get a token with: crm token issue --data-dir {} --actor <you> --role admin",
            data_dir.display()
        );
    }
    // Printed last: scripts and tests wait for this line.
    println!("crm listening on http://{address}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let mut stopping = stopping;
            let _ = stopping.wait_for(|stop| *stop).await;
        })
        .await
        .context("serving HTTP")?;
    if let Some(task) = grpc_task {
        let _ = task.await;
    }
    // In-flight commands have been answered and the runner was told to stop;
    // let it finish its batch, then make sure everything acknowledged is on disk.
    if let Err(error) = projection_task.await {
        tracing::error!(%error, "projection runner ended abnormally");
    }
    log.close().await;
    tracing::info!("crm stopped");
    Ok(())
}

/// `/openapi.json`: the command API and the query API in one document.
///
/// Serialized once, held as shared bytes: axum copies the router's handlers
/// for every accepted connection, and a handler owning the document itself
/// (about a megabyte of utoipa structures) made each open connection cost
/// that much (heaptrack: 371 MB of copies under the benchmark's load).
pub(crate) fn openapi_route() -> axum::Router {
    use utoipa::OpenApi;
    let mut document = crm_command_service::openapi::ApiDoc::openapi();
    document.merge(crm_query_service::LogApiDoc::openapi());
    let body = axum::body::Bytes::from(
        serde_json::to_vec(&document).expect("the OpenAPI document serializes"),
    );
    axum::Router::new().route(
        "/openapi.json",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    )
}

/// Runner pacing; `CRM_PROJECTION_PAUSE_MS` slows folding down (crash tests only).
pub(crate) fn runner_settings() -> RunnerSettings {
    let mut settings = RunnerSettings::default();
    if let Some(batch) = std::env::var("CRM_PROJECTION_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.batch_size = batch;
    }
    if let Some(pause) = std::env::var("CRM_PROJECTION_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.pause_per_event = Some(Duration::from_millis(pause));
    }
    settings
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

pub(crate) fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
