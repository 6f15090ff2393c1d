//! The services one by one, for the distributed mode: `crm command-service`,
//! `crm projection-service`, `crm query-service`, and `crm migrate`, each
//! configured by flags or environment and sharing PostgreSQL.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use clap::Args;
use crm_command_service::{App, Executor, Tokens};
use crm_eventlog::relay::{Relay, RelaySettings};
use crm_eventlog::EventLog;
use crm_projection_service::bus::BusSettings;
use crm_projection_service::runner::{install, Folding};
use crm_projection_service::worker::{Worker, WorkerSettings};
use crm_projection_service::{all_projections, ReadDb};
use crm_query_service::{LiveSettings, QueryState};

use crate::grpc;
use crate::health::{self, Dependencies};
use crate::serve::{init_tracing, openapi_route, runner_settings, shutdown_signal};

/// Where a distributed service finds its stores.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// The event log (PostgreSQL in production).
    #[arg(long, env = "CRM_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The read models; defaults to the event log's database.
    #[arg(long, env = "CRM_READ_DATABASE_URL", hide_env_values = true)]
    read_database_url: Option<String>,
}

impl StoreArgs {
    async fn log(&self) -> anyhow::Result<EventLog> {
        EventLog::connect(&self.database_url)
            .await
            .context("connecting to the event log")
    }

    async fn read(&self) -> anyhow::Result<ReadDb> {
        let url = self
            .read_database_url
            .as_deref()
            .unwrap_or(&self.database_url);
        ReadDb::connect(url)
            .await
            .context("connecting to the read-model database")
    }
}

/// What every long-running service takes.
#[derive(Args, Clone)]
pub struct ServiceArgs {
    #[command(flatten)]
    stores: StoreArgs,
    /// Address of the HTTP API (health, metrics and the service's routes).
    #[arg(long, env = "CRM_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// Token signing secret (>= 32 bytes), the same for every service.
    #[arg(
        long = "token-secret",
        env = "CRM_TOKEN_SECRET",
        hide_env_values = true
    )]
    token_secret: String,
    /// Log as JSON lines.
    #[arg(long, env = "CRM_LOG_JSON", default_value_t = false)]
    log_json: bool,
}

impl ServiceArgs {
    fn tokens(&self) -> anyhow::Result<Arc<Tokens>> {
        Ok(Arc::new(Tokens::new(self.token_secret.as_bytes())?))
    }
}

/// The query service's own options: gRPC.
#[derive(Args, Clone)]
pub struct QueryArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Address of the gRPC API (the read-model queries, record and stream
    /// reads); off when unset.
    #[arg(long, env = "CRM_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
}

/// The command service's own options: gRPC and the relay to NATS.
#[derive(Args, Clone)]
pub struct CommandArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Address of the gRPC API (commands, record and stream reads); off when unset.
    #[arg(long, env = "CRM_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// NATS with JetStream: committed events are relayed there; no relay when unset.
    #[arg(long, env = "CRM_NATS_URL")]
    nats_url: Option<String>,
    /// JetStream stream the relay publishes to.
    #[arg(long, env = "CRM_NATS_STREAM", default_value = "CRM_EVENTS")]
    nats_stream: String,
    /// Subject prefix: subjects are `<prefix>.<tenant>.<stream_type>.<stream_id>`.
    #[arg(long, env = "CRM_NATS_SUBJECT_PREFIX", default_value = "crm")]
    nats_subject_prefix: String,
}

/// The projection workers' own options: partitions and JetStream.
#[derive(Args, Clone)]
pub struct ProjectionArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Stream partitions of the stream-local read models; every worker of a
    /// deployment must use the same count (changing it needs `crm rebuild`).
    #[arg(long, env = "CRM_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    partitions: u32,
    /// Workers of one deployment share units, leases and consumer names by this name.
    #[arg(long, env = "CRM_WORKER_GROUP", default_value = "crm", value_parser = parse_group)]
    group: String,
    /// NATS with JetStream: units read events from durable consumers there
    /// (the log fills any gap); log only when unset.
    #[arg(long, env = "CRM_NATS_URL")]
    nats_url: Option<String>,
    /// JetStream stream the relay publishes to.
    #[arg(long, env = "CRM_NATS_STREAM", default_value = "CRM_EVENTS")]
    nats_stream: String,
    /// The relay's subject prefix.
    #[arg(long, env = "CRM_NATS_SUBJECT_PREFIX", default_value = "crm")]
    nats_subject_prefix: String,
}

/// A worker group name: it goes into lease keys, the lease connection's
/// application name and JetStream consumer names.
fn parse_group(text: &str) -> Result<String, String> {
    let valid = (1..=40).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(text.to_string())
    } else {
        Err("1-40 characters of letters, digits, '-' or '_'".to_string())
    }
}

/// `crm migrate`: brings the event log and the read models to the current
/// schema (and installs every projection), then exits.
pub async fn migrate(stores: StoreArgs) -> anyhow::Result<()> {
    init_tracing(false);
    let log = stores.log().await?;
    let read = stores.read().await?;
    install(&log, &read, &all_projections(), Folding::Undecided)
        .await
        .context("installing the projections")?;
    log.close().await;
    println!("migrations applied");
    Ok(())
}

/// `crm command-service`: the command API (HTTP, and gRPC when asked) over
/// the shared log, relaying committed events to JetStream when NATS is set.
pub async fn command_service(args: CommandArgs) -> anyhow::Result<()> {
    init_tracing(args.service.log_json);
    let tokens = args.service.tokens()?;
    // The recorder goes in first so nothing counted at startup is lost.
    let metrics = crate::telemetry::metrics_routes(tokens.clone())?;
    let log = args.service.stores.log().await?;
    let app = App {
        executor: Arc::new(Executor::new(log.clone())),
        tokens: tokens.clone(),
    };
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut background = Vec::new();
    if let Some(nats_url) = &args.nats_url {
        let settings = RelaySettings {
            nats_url: nats_url.clone(),
            stream: args.nats_stream.clone(),
            subject_prefix: args.nats_subject_prefix.clone(),
            ..RelaySettings::default()
        };
        let relay = Relay::new(log.clone(), settings).context("configuring the relay to NATS")?;
        let stopping = stopping.clone();
        background.push(tokio::spawn(async move {
            if let Err(error) = relay.run(stopping).await {
                tracing::error!(%error, "relay to NATS stopped");
            }
        }));
    }
    if let Some(address) = args.grpc_addr {
        let router = crm_service_kit::http::stack(crm_command_service::routes(app.clone()));
        let front = grpc::Front::CommandsAndQueries;
        let (_, task) = grpc::spawn(address, router, front, stopping.clone()).await?;
        background.push(task);
    }
    let routes = crm_command_service::routes(app)
        .merge(metrics)
        .merge(openapi_route());
    run_http_until("command-service", args.service.http_addr, routes, stop).await?;
    for task in background {
        let _ = task.await;
    }
    log.close().await;
    Ok(())
}

/// `crm query-service`: read models, time travel, raw stream history and
/// feeds over HTTP, and the gRPC `QueryService` when `--grpc-addr` is set.
pub async fn query_service(args: QueryArgs) -> anyhow::Result<()> {
    let QueryArgs { service, grpc_addr } = args;
    init_tracing(service.log_json);
    let tokens = service.tokens()?;
    let metrics = crate::telemetry::metrics_routes(tokens.clone())?;
    let log = service.stores.log().await?;
    let read = service.stores.read().await?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let live = LiveSettings {
        shutdown: Some(stopping.clone()),
        ..LiveSettings::default()
    };
    let queries = QueryState::new(log.clone(), tokens.clone())
        .with_live(live)
        .with_read_models(read.clone());
    // Raw stream history reads the log, not a read model: served here too,
    // so every `QueryService` call has its route in this process.
    let history = crm_command_service::history_routes(App {
        executor: Arc::new(Executor::new(log.clone())),
        tokens: tokens.clone(),
    });
    let reads = crm_query_service::routes(queries).merge(history);
    let mut grpc = None;
    if let Some(address) = grpc_addr {
        let router = crm_service_kit::http::stack(reads.clone());
        let front = grpc::Front::Queries;
        grpc = Some(
            grpc::spawn(address, router, front, stopping.clone())
                .await?
                .1,
        );
    }
    let routes = reads
        .merge(health::routes(Dependencies {
            log: log.clone(),
            read: Some(read),
        }))
        .merge(metrics);
    run_http_until("query-service", service.http_addr, routes, stop).await?;
    if let Some(task) = grpc {
        let _ = task.await;
    }
    log.close().await;
    Ok(())
}

/// `crm projection-service`: the projection workers, plus health, metrics and
/// `/v1/projections` over HTTP.
pub async fn projection_service(args: ProjectionArgs) -> anyhow::Result<()> {
    init_tracing(args.service.log_json);
    let tokens = args.service.tokens()?;
    // Before the workers start, so their first gauges and counters are kept.
    let metrics = crate::telemetry::metrics_routes(tokens.clone())?;
    let log = args.service.stores.log().await?;
    let read = args.service.stores.read().await?;
    let runner = runner_settings();
    let settings = WorkerSettings {
        partitions: args.partitions,
        batch_size: runner.batch_size,
        pause_per_event: runner.pause_per_event,
        group: args.group.clone(),
        bus: args.nats_url.as_ref().map(|nats_url| BusSettings {
            nats_url: nats_url.clone(),
            stream: args.nats_stream.clone(),
            subject_prefix: args.nats_subject_prefix.clone(),
            consumer_prefix: format!("{}-projections", args.group),
        }),
        ..WorkerSettings::default()
    };
    let worker = Worker::new(log.clone(), read.clone(), all_projections(), settings);
    worker
        .install()
        .await
        .context("installing the projections")?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let workers = tokio::spawn(worker.run(stopping.clone()));
    let reporter = tokio::spawn(crm_projection_service::status::report_progress(
        read.clone(),
        log.clone(),
        stopping,
    ));
    let status = QueryState::new(log.clone(), tokens.clone()).with_read_models(read.clone());
    let routes = crm_query_service::read::projection_status_routes()
        .with_state(status)
        .merge(health::routes(Dependencies {
            log: log.clone(),
            read: Some(read),
        }))
        .merge(metrics);
    run_http_until("projection-service", args.service.http_addr, routes, stop).await?;
    if let Err(error) = workers.await {
        tracing::error!(%error, "projection workers ended abnormally");
    }
    let _ = reporter.await;
    log.close().await;
    Ok(())
}

/// Serves until SIGTERM/Ctrl-C, then flips `stop` (live feeds, workers) and
/// finishes in-flight requests.
async fn run_http_until(
    name: &str,
    address: SocketAddr,
    routes: Router,
    stop: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, service = name, "serving");
    println!("crm {name} listening on http://{address}");
    let mut stopping = stop.subscribe();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    axum::serve(listener, crm_service_kit::http::stack(routes))
        .with_graceful_shutdown(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        })
        .await
        .context("serving HTTP")
}
