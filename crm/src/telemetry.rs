//! Prometheus metrics of the process, served at `/metrics` to any
//! authenticated caller (Prometheus sends a bearer token).
//!
//! Every `*_seconds` histogram (command, append and HTTP request latency) is
//! exported as a Prometheus histogram with [`LATENCY_BUCKETS`], so replicas
//! can be aggregated and quantiles computed with `histogram_quantile`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, State};
use axum::routing::get;
use axum::Router;
use crm_command_service::Tokens;
use crm_service_kit::auth::{Actor, ReadArea};
use crm_service_kit::problem::Problem;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

#[derive(Clone)]
struct MetricsState {
    tokens: Arc<Tokens>,
    handle: PrometheusHandle,
}

impl FromRef<MetricsState> for Arc<Tokens> {
    fn from_ref(state: &MetricsState) -> Self {
        state.tokens.clone()
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide recorder and returns the `/metrics` route.
pub fn metrics_routes(tokens: Arc<Tokens>) -> anyhow::Result<Router> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    // Without an HTTP listener of its own the exporter needs periodic upkeep,
    // or histogram buckets would grow without bound.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(Router::new()
        .route("/metrics", get(render))
        .with_state(MetricsState { tokens, handle }))
}

async fn render(State(state): State<MetricsState>, actor: Actor) -> Result<String, Problem> {
    actor.require_read(ReadArea::Projections)?;
    Ok(state.handle.render())
}
