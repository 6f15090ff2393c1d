//! Starting a service's gRPC front beside its HTTP API: the gRPC calls are
//! answered by the same router, in-process (same auth, validation, problems
//! and metrics as HTTP).

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which gRPC services a process offers.
#[derive(Debug, Clone, Copy)]
pub enum Front {
    /// `CommandService` and `QueryService` (the router serves both kinds of routes).
    CommandsAndQueries,
    /// `QueryService` alone (a process without the command API).
    Queries,
}

/// Binds `address` and serves `front` through `router` until `stopping`
/// turns true; returns the bound address and the server task.
pub async fn spawn(
    address: SocketAddr,
    router: Router,
    front: Front,
    mut stopping: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding gRPC {address}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, ?front, "gRPC serving");
    let shutdown = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let task = tokio::spawn(async move {
        let served = match front {
            Front::CommandsAndQueries => {
                crm_command_service::grpc::serve(listener, router.clone(), router, shutdown).await
            }
            Front::Queries => {
                crm_command_service::grpc::serve_queries(listener, router, shutdown).await
            }
        };
        if let Err(error) = served {
            tracing::error!(%error, "gRPC server stopped");
        }
    });
    Ok((bound, task))
}
