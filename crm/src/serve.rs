//! `crm serve`: the command API on the embedded SQLite log (or the
//! PostgreSQL one named by `CRM_DATABASE_URL`), with graceful shutdown.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use crm_command_service::{App, Executor, Tokens};
use crm_eventlog::EventLog;

use crate::secret::{self, SecretSource};
use crate::DataArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "CRM_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
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
    let log = match &args.database_url {
        Some(url) => EventLog::connect(url)
            .await
            .context("connecting to the event log")?,
        None => EventLog::open_sqlite(&data_dir.join("crm.db"))
            .await
            .context("opening the embedded event log")?,
    };
    let app = App::new(Executor::new(log.clone()), tokens);
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let address = listener.local_addr()?;
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
    axum::serve(listener, crm_command_service::router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    // In-flight commands have been answered; make sure everything acknowledged is on disk.
    log.close().await;
    tracing::info!("crm stopped");
    Ok(())
}

async fn shutdown_signal() {
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

fn init_tracing(json: bool) {
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
