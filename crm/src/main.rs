//! `crm`: the one binary a user installs. `crm serve` runs the service on the
//! embedded store; `crm token issue` prints a bearer token.

mod grpc;
mod health;
mod rebuild;
mod secret;
mod serve;
mod services;
mod stores;
mod telemetry;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use crm_command_service::{Role, Tokens};

/// jemalloc for Rust's allocations (the default `jemalloc` feature;
/// `--no-default-features` gives glibc's, `--features mimalloc` mimalloc).
/// Measured (bench/README.md, cause 4): a history rebuild of a million events
/// by hand took 16.1-18.1 s with jemalloc preloaded against 26.9-27.4 s with
/// glibc's malloc, whose
/// frees of the fold's short-lived values (decoded events, lookup rows) went
/// to `malloc_consolidate` and the arena locks; `crm serve` peaked at 107.56 MB
/// with a million events against 95.34 MB with glibc's (target 150 MB), and
/// mimalloc had peaked at 157.48 MB with 100,000. SQLite's own allocations
/// stay with glibc's malloc (see [`limit_malloc_arenas`]).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "crm",
    version,
    about = "CRM event store: commands, event log, audit trail"
)]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run the service in one process on the embedded SQLite store.
    Serve(serve::ServeArgs),
    /// Bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Replay the log into a fresh generation of a projection, then switch to it.
    Rebuild(rebuild::RebuildArgs),
    /// Apply the event-log and read-model migrations, then exit.
    Migrate(services::StoreArgs),
    /// Distributed mode: the command API alone.
    CommandService(services::CommandArgs),
    /// Distributed mode: the projection workers alone.
    ProjectionService(services::ProjectionArgs),
    /// Distributed mode: the query API alone.
    QueryService(services::QueryArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a signed token for an actor (just the token, on stdout).
    Issue(IssueArgs),
}

/// Where the data (and the generated token secret) live.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Directory of the embedded store and the generated token secret.
    #[arg(long, env = "CRM_DATA_DIR", default_value = "./crm-data")]
    pub data_dir: PathBuf,
    /// Token signing secret (>= 32 bytes); by default generated into the data dir.
    #[arg(
        long = "token-secret",
        env = "CRM_TOKEN_SECRET",
        hide_env_values = true
    )]
    pub token_secret: Option<String>,
}

#[derive(Args)]
struct IssueArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Who the token speaks for; recorded as the actor of every event.
    #[arg(long)]
    actor: String,
    /// Role(s): admin, sales, support, viewer, auditor (repeat or comma-separate).
    #[arg(long = "role", required = true, value_delimiter = ',')]
    roles: Vec<Role>,
    /// Days until the token expires.
    #[arg(long, default_value_t = 30)]
    days: i64,
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Verb::Serve(args) => block_on(serve::serve(args)),
        Verb::Rebuild(args) => block_on(rebuild::rebuild(args)),
        Verb::Migrate(args) => block_on(services::migrate(args)),
        Verb::CommandService(args) => block_on(services::command_service(args)),
        Verb::ProjectionService(args) => block_on(services::projection_service(args)),
        Verb::QueryService(args) => block_on(services::query_service(args)),
        Verb::Token(TokenCommand::Issue(args)) => {
            let (secret, _) =
                secret::load_or_create(args.data.token_secret.as_deref(), &args.data.data_dir)?;
            let tokens = Tokens::new(&secret)?;
            let token =
                tokens.issue(&args.actor, &args.roles, chrono::Duration::days(args.days))?;
            println!("{token}");
            Ok(())
        }
    }
}

/// For what still allocates with glibc's malloc (SQLite's C code, and all of
/// `crm` built without jemalloc): glibc gives threads that allocate at once arenas of their own, up to 8 per
/// CPU, and memory freed in one arena serves only that arena: with the tokio
/// workers, the blocking pool and a thread per SQLite connection, RSS grew
/// with the number of arenas, not with the data. Two per CPU: on 2 CPUs,
/// 20,000-event embedded runs (bench/README.md) peaked at 65-67 MiB after the
/// restart against 81-82 with glibc's 16, commands/s within the runs' spread;
/// one per CPU saved more (60-73 MiB) but cost about an eighth of the
/// commands/s (malloc lock contention). `MALLOC_ARENA_MAX`, when set, is glibc's own and wins.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(2, |cpus| cpus.get());
    let arenas = libc::c_int::try_from(2 * cpus).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets an allocator parameter, and runs before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
fn limit_malloc_arenas() {}

fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(work)
}
