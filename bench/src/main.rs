//! `crm-bench`: runs the load scenarios against real `crm serve` processes
//! and the baselines beside them, and prints one Markdown report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use crm_bench::dataset::{self, Dataset};
use crm_bench::direct::{self, Positions};
use crm_bench::plan::StreamPlan;
use crm_bench::report::{ratio, Report};
use crm_bench::runs::{self, Fleet};
use crm_bench::server::{self, Backend, Server};
use crm_bench::stats::RunResult;
use crm_bench::workload::World;
use crm_bench::{cqrs_baseline, machine};

#[derive(Parser)]
#[command(
    name = "crm-bench",
    about = "Load generator and side-by-side comparisons for the CRM service"
)]
struct Args {
    /// Short runs and small data: checks that every scenario works (CI), not speed.
    #[arg(long)]
    smoke: bool,
    /// Concurrent clients of the command-throughput runs (and the direct inserts).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds each throughput, lag and query run lasts.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Query runs: requests per second.
    #[arg(long, default_value_t = 2000.0)]
    query_rate: f64,
    /// Events in the embedded store for the memory and rebuild runs.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Stream lengths of the cqrs-es comparison.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    stream_lengths: Vec<usize>,
    /// Clients of the stream-length comparison (each owns its streams).
    #[arg(long, default_value_t = 16)]
    stream_clients: usize,
    /// Only these scenarios (comma-separated): direct, postgres, streams, sqlite.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The Maven CRM sample the load is seeded from.
    #[arg(long, default_value_os_t = dataset::default_dir())]
    dataset: PathBuf,
    /// Admin URL of the PostgreSQL server (throwaway databases are made there).
    #[arg(
        long,
        env = "CRM_TEST_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// Also write the report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Leave the embedded section's SQLite store on disk (its path goes to
    /// stderr) instead of deleting it: a filled store to profile `crm rebuild`
    /// or `crm serve` on.
    #[arg(long)]
    keep_store: bool,
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }

    fn duration(&self) -> Duration {
        if self.smoke {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(self.duration)
        }
    }

    /// Commands per client of the stream-length run at `len`: enough for
    /// stable percentiles, few enough that cqrs-es at 10,000 events ends.
    fn stream_commands(&self, len: usize) -> usize {
        match (self.smoke, len) {
            (true, _) => 10,
            (false, 0..=100) => 200,
            (false, 101..=1000) => 100,
            (false, _) => 50,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.clients = args.clients.min(4);
        args.query_rate = args.query_rate.min(200.0);
        args.events = args.events.min(2_000);
        args.stream_lengths = vec![10, 100];
        args.stream_clients = 2;
    }
    // The throwaway-database helper reads the admin URL from the environment;
    // set before any thread starts.
    std::env::set_var("CRM_TEST_PG_URL", &args.pg_url);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let data = Dataset::load(&args.dataset)?;
    let mut report = Report::default();
    report.line(format!(
        "# crm-bench report{}",
        if args.smoke {
            " (smoke mode: not a measurement)"
        } else {
            ""
        }
    ));
    report.line(machine::describe(&args.pg_url).await);
    report.line(format!(
        "clients {}, {} s per run, query rate {}/s, stream clients {}, embedded store filled to {} events",
        args.clients,
        args.duration().as_secs(),
        args.query_rate,
        args.stream_clients,
        args.events
    ));

    let direct = if args.wants("direct") || args.wants("postgres") {
        report.heading("(a) Direct event-row inserts into PostgreSQL (the physical limit)");
        let one = direct::run(args.clients, args.duration(), 1, Positions::Counter).await?;
        let batched = direct::run(args.clients, args.duration(), 100, Positions::Counter).await?;
        let at_head = direct::run(args.clients, args.duration(), 1, Positions::LogHead).await?;
        report.runs(&[&one, &batched, &at_head]);
        report.line("The log_head run takes each row's position from the log's one-row head as the service's log does (gap-free positions): the row lock makes the commits take turns, one flush each.");
        Some(Direct { one, at_head })
    } else {
        None
    };

    if args.wants("postgres") {
        postgres(&args, &data, &mut report, direct.as_ref()).await?;
    }
    if args.wants("streams") {
        streams(&args, &data, &mut report).await?;
    }
    if args.wants("sqlite") {
        sqlite(&args, &data, &mut report).await?;
    }
    report.summary();
    if let Some(path) = &args.output {
        std::fs::write(path, report.text())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Registers the dataset's accounts on `server` and warms `clients` clients
/// up (a 2 s closed loop); on PostgreSQL the timed runs then start on fresh
/// planner statistics (see `Server::analyze`).
async fn warmed_up(
    server: &Server,
    data: &Dataset,
    clients: usize,
    seed: u64,
) -> anyhow::Result<(Arc<World>, Fleet)> {
    let world = World::register(&server.target, data.clone()).await?;
    let mut fleet = Fleet::new(&world, clients, seed);
    fleet
        .closed_loop(&server.target, Duration::from_secs(2), "warm-up")
        .await?;
    server.analyze().await?;
    Ok((world, fleet))
}

/// The direct-insert runs the PostgreSQL section compares with.
struct Direct {
    /// One row per transaction, positions from a counter (the target's baseline).
    one: RunResult,
    /// One row per transaction, positions from the log's `log_head` row.
    at_head: RunResult,
}

/// HTTP commands on PostgreSQL: peak throughput, lag at half of it, queries.
async fn postgres(
    args: &Args,
    data: &Dataset,
    report: &mut Report,
    direct: Option<&Direct>,
) -> anyhow::Result<()> {
    report.heading("crm serve on PostgreSQL: HTTP commands, projection lag, queries");
    let server = Server::start(Backend::Postgres).await?;
    let target = server.target.clone();
    let (world, mut fleet) = warmed_up(&server, data, args.clients, 1).await?;
    let peak = fleet
        .closed_loop(&target, args.duration(), "commands, closed loop (peak)")
        .await?;
    let half = peak.result.rate() / 2.0;
    // The closed loop outruns the projections; lag is measured from a caught-up start.
    let peak_head = peak.head();
    runs::wait_caught_up(&target, peak_head, Duration::from_secs(600)).await?;
    server.analyze().await?;
    let database_url = server
        .database_url()
        .context("a PostgreSQL server has a database")?;
    let (stop, watcher) = runs::watch_checkpoints(database_url);
    let paced = fleet
        .paced(
            &target,
            half,
            args.duration(),
            &format!("commands paced at {half:.0}/s (half of peak)"),
        )
        .await?;
    let head = paced.head();
    runs::wait_caught_up(&target, head, Duration::from_secs(120)).await?;
    stop.send(true).ok();
    let samples = watcher.await.context("lag watcher panicked")??;
    let (lag_latencies, unseen) = runs::lags(&paced.acks, &samples);
    let lag = RunResult::new(
        "projection lag (ack -> every read model), paced run",
        paced.result.elapsed,
        lag_latencies,
        unseen as u64,
    );
    server.analyze().await?;
    let queries = query_runs(args, &target, &world, "").await?;
    report.runs(&[&peak.result, &paced.result, &lag, &queries[0], &queries[1]]);
    report.line("Lag is sampled every 1 ms from the read models' checkpoints (rm_projections), so it reads up to ~1 ms high.");
    if let Some(Direct {
        one: direct_one,
        at_head,
    }) = direct
    {
        report.line(format!(
            "HTTP commands/s on PostgreSQL / direct one-row inserts with positions from log_head at {} clients: {:.0} / {:.0} = {:.2}x",
            args.clients,
            peak.result.rate(),
            at_head.rate(),
            ratio(peak.result.rate(), at_head.rate())
        ));
        let r = ratio(peak.result.rate(), direct_one.rate());
        report.line(format!(
            "HTTP commands/s on PostgreSQL / direct one-row-per-transaction inserts/s at {} clients: {:.0} / {:.0} = {r:.2}x",
            args.clients,
            peak.result.rate(),
            direct_one.rate()
        ));
        report.target(
            "PostgreSQL HTTP commands/s >= 1.5x direct 1-row/tx inserts",
            r,
            1.5,
            false,
            "x",
        );
    }
    report.target(
        "projection lag p99 at half of peak load <= 50 ms",
        lag.p99_ms(),
        50.0,
        true,
        " ms",
    );
    query_targets(report, &queries, "PostgreSQL");
    server.finish().await;
    commands_alone(args, data, report, direct).await
}

/// The same closed loop on `crm command-service` alone (a fresh database):
/// the command path without the read models folding beside it, in the same
/// process and the same PostgreSQL.
async fn commands_alone(
    args: &Args,
    data: &Dataset,
    report: &mut Report,
    direct: Option<&Direct>,
) -> anyhow::Result<()> {
    report.heading("crm command-service alone on PostgreSQL: the command path without read models");
    let server = Server::start_command_service().await?;
    let target = server.target.clone();
    let (_, mut fleet) = warmed_up(&server, data, args.clients, 1).await?;
    let alone = fleet
        .closed_loop(
            &target,
            args.duration(),
            "commands, closed loop, crm command-service alone (no read models)",
        )
        .await?;
    server.finish().await;
    report.runs(&[&alone.result]);
    if let Some(Direct { one, at_head }) = direct {
        report.line(format!(
            "crm command-service alone / direct one-row inserts at {} clients: {:.0} / {:.0} = {:.2}x; / direct with positions from log_head: {:.0} / {:.0} = {:.2}x",
            args.clients,
            alone.result.rate(),
            one.rate(),
            ratio(alone.result.rate(), one.rate()),
            alone.result.rate(),
            at_head.rate(),
            ratio(alone.result.rate(), at_head.rate())
        ));
    }
    Ok(())
}

/// Judges each query run against the 5 ms p99 target.
fn query_targets(report: &mut Report, queries: &[RunResult], backend: &str) {
    for query in queries {
        report.target(
            &format!("{} p99 <= 5 ms ({backend})", query.name),
            query.p99_ms(),
            5.0,
            true,
            " ms",
        );
    }
}

/// Paced queries sent, not measured, before each query run.
const QUERY_WARM_UP: Duration = Duration::from_secs(2);

/// The timeline page and the pipeline board, each at `--query-rate` after a
/// warm-up at that rate; `when` ends the runs' names.
async fn query_runs(
    args: &Args,
    target: &crm_bench::server::Target,
    world: &Arc<World>,
    when: &str,
) -> anyhow::Result<Vec<RunResult>> {
    let timelines: Vec<String> = world
        .account_ids
        .iter()
        .map(|id| format!("/v1/customers/{id}/history?limit=50"))
        .collect();
    let boards = ["/v1/pipeline".to_string()];
    let mut runs = Vec::new();
    for (paths, name) in [
        (&timelines[..], "timeline page (50 entries)"),
        (&boards[..], "pipeline board"),
    ] {
        // Unmeasured, as before the command runs: the first requests meet a
        // cold cache and cold database pages, and a run measures the rate.
        runs::paced_queries(target, paths, args.query_rate, QUERY_WARM_UP, "warm-up").await?;
        runs.push(
            runs::paced_queries(
                target,
                paths,
                args.query_rate,
                args.duration(),
                &format!("{name} at {}/s{when}", args.query_rate),
            )
            .await?,
        );
    }
    Ok(runs)
}

/// Our opportunity updates vs plain cqrs-es at each stream length: through
/// `crm serve` (the read models folding beside the commands) and through
/// `crm command-service` alone (the command path only, as the baseline has no
/// read models either).
async fn streams(args: &Args, data: &Dataset, report: &mut Report) -> anyhow::Result<()> {
    report.heading("(b) Opportunity updates by stream length: crm (HTTP, PostgreSQL) vs cqrs-es 0.5 + postgres-es");
    let mut serve = Vec::new();
    let mut alone = Vec::new();
    let mut theirs = Vec::new();
    for &len in &args.stream_lengths {
        let plan = StreamPlan {
            stream_len: len,
            clients: args.stream_clients,
            commands_per_client: args.stream_commands(len),
        };
        for (ours, start) in [(&mut serve, false), (&mut alone, true)] {
            let server = if start {
                Server::start_command_service().await?
            } else {
                Server::start(Backend::Postgres).await?
            };
            let world = World::register(&server.target, data.clone()).await?;
            ours.push(runs::streams(&server, &world, plan).await?);
            server.finish().await;
        }
        theirs.push(cqrs_baseline::run(plan).await?);
    }
    let all: Vec<&RunResult> = serve
        .iter()
        .zip(&alone)
        .zip(&theirs)
        .flat_map(|((a, b), c)| [a, b, c])
        .collect();
    report.runs(&all);
    for (ours, which) in [(&serve, "crm serve"), (&alone, "crm command-service alone")] {
        stream_targets(args, report, ours, &theirs, which);
    }
    Ok(())
}

/// The stream-length targets for one of our runs (`which`) against cqrs-es.
fn stream_targets(
    args: &Args,
    report: &mut Report,
    ours: &[RunResult],
    theirs: &[RunResult],
    which: &str,
) {
    for ((len, ours), theirs) in args.stream_lengths.iter().zip(ours).zip(theirs) {
        let r = ratio(ours.rate(), theirs.rate());
        report.line(format!(
            "{len} events/stream: {which} {:.0}/s vs cqrs-es {:.0}/s = {r:.2}x",
            ours.rate(),
            theirs.rate()
        ));
        let minimum = match len {
            10 => 5.0,
            1000 => 20.0,
            _ => continue,
        };
        report.target(
            &format!("{which}: commands/s vs cqrs-es at {len}-event streams >= {minimum}x"),
            r,
            minimum,
            false,
            "x",
        );
    }
    let short = args.stream_lengths.iter().position(|&len| len == 10);
    let long = args.stream_lengths.iter().position(|&len| len == 10_000);
    if let (Some(short), Some(long)) = (short, long) {
        let r = ratio(ours[long].p50_ms(), ours[short].p50_ms());
        report.target(
            &format!("{which}: p50 at 10,000-event streams / p50 at 10-event streams <= 1.2"),
            r,
            1.2,
            true,
            "x",
        );
    }
}

/// The embedded default: throughput, queries, memory with `--events` in the
/// log, and rebuild speed.
async fn sqlite(args: &Args, data: &Dataset, report: &mut Report) -> anyhow::Result<()> {
    report.heading("crm serve on embedded SQLite: HTTP commands, queries, memory, rebuild");
    let mut server = Server::start(Backend::Sqlite).await?;
    let target = server.target.clone();
    let (world, mut fleet) = warmed_up(&server, data, args.clients, 1001).await?;
    let peak = fleet
        .closed_loop(&target, args.duration(), "commands, closed loop (peak)")
        .await?;
    // Queries are measured on caught-up read models, as in the PostgreSQL section.
    let peak_head = peak.head();
    runs::wait_caught_up(&target, peak_head, Duration::from_secs(600)).await?;
    let queries = query_runs(args, &target, &world, "").await?;
    let fill = fleet.fill(&target, args.events).await?;
    let head = fill.head();
    let names = runs::wait_caught_up(&target, head, Duration::from_secs(1800)).await?;
    let loaded = server.memory_mib()?;
    report.runs(&[&peak.result, &queries[0], &queries[1], &fill.result]);
    report.target(
        "embedded SQLite HTTP commands/s >= 20,000",
        peak.result.rate(),
        20_000.0,
        false,
        "/s",
    );
    query_targets(report, &queries, "SQLite");

    let rebuilds = runs::rebuild(&server, &names).await?;
    let total: Duration = rebuilds.iter().map(|(_, time)| *time).sum();
    for (name, time) in &rebuilds {
        report.line(format!(
            "rebuild {name}: {head} events in {:.2} s = {:.0} events/s",
            time.as_secs_f64(),
            head as f64 / time.as_secs_f64()
        ));
    }
    let slowest = rebuilds
        .iter()
        .map(|(_, time)| head as f64 / time.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    report.line(format!(
        "rebuild of all {} projections: {:.2} s",
        rebuilds.len(),
        total.as_secs_f64()
    ));
    report.target(
        "rebuild events/s (slowest projection) >= 100,000",
        slowest,
        100_000.0,
        false,
        "/s",
    );
    let (read, reading) = runs::read_whole_log(&server.data_dir().join(server::LOG_FILE)).await?;
    anyhow::ensure!(
        read == head,
        "reading the whole log gave {read} events, its head is {head}"
    );
    report.line(format!(
        "reading the log alone as a rebuild does ({read} events, 2,000 per batch, decoded, nothing folded): {:.2} s = {:.0} events/s, the most any rebuild can reach",
        reading.as_secs_f64(),
        read as f64 / reading.as_secs_f64()
    ));

    server.restart().await?;
    let target = server.target.clone();
    runs::wait_caught_up(&target, head, Duration::from_secs(600)).await?;
    let restarted = server.memory_mib()?;
    let mut fleet = Fleet::new(&world, args.clients, 2001);
    let after = fleet
        .closed_loop(&target, args.duration(), "commands after restart")
        .await?;
    // Straight after the closed loop the read models are still folding its
    // commands: these queries meet a read model that moves under them.
    let (checkpoint, _) = runs::projections_checkpoint(&target).await?;
    let backlog = after.head() - checkpoint;
    let folding = query_runs(
        args,
        &target,
        &world,
        &format!(", read models {backlog} events behind at the start"),
    )
    .await?;
    runs::wait_caught_up(&target, after.head(), Duration::from_secs(600)).await?;
    let caught_up = query_runs(
        args,
        &target,
        &world,
        &format!(", caught up, {} events", after.head()),
    )
    .await?;
    let busy = server.memory_mib()?;
    report.runs(&[
        &after.result,
        &folding[0],
        &folding[1],
        &caught_up[0],
        &caught_up[1],
    ]);
    query_targets(report, &caught_up, "SQLite");
    report.line(format!(
        "crm serve memory with {head} events in the log: RSS {:.0} MiB after the fill (peak {:.0}); after a restart {:.0} MiB; after {} s of commands and queries {:.0} MiB (peak since restart {:.0})",
        loaded.rss_mib, loaded.peak_rss_mib, restarted.rss_mib, args.duration().as_secs(), busy.rss_mib, busy.peak_rss_mib
    ));
    let worst = loaded.peak_rss_mib.max(busy.peak_rss_mib);
    report.target(
        &format!("crm serve peak RSS with {head} events <= 150 MB"),
        worst * 1.048_576,
        150.0,
        true,
        " MB",
    );
    if args.keep_store {
        let store = server.keep_store().await;
        eprintln!(
            "crm-bench: the embedded store is kept in {}",
            store.display()
        );
    } else {
        server.finish().await;
    }
    Ok(())
}
