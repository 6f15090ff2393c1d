//! `crm rebuild <projection|all>`: replay the log into a new generation of a
//! projection's tables (the old one keeps serving), then switch, with a
//! progress bar showing events/s and ETA.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

/// How much of the embedded log a rebuild maps: all of it, as far as SQLite
/// allows (its build caps the mapping, at 2 GB for the bundled one; pages
/// beyond are read as before).
const LOG_MAP_BYTES: u64 = 1 << 40;

#[derive(Args)]
pub struct RebuildArgs {
    /// A projection name, or `all`.
    projection: String,
    #[arg(long, env = "CRM_DATA_DIR", default_value = "./crm-data")]
    data_dir: PathBuf,
    #[arg(long, env = "CRM_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The read models' database, when not the log's (as the distributed
    /// services take it); needs `--database-url`.
    #[arg(long, env = "CRM_READ_DATABASE_URL", hide_env_values = true)]
    read_database_url: Option<String>,
}

pub async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let projections = crm_projection_service::all_projections();
    let chosen: Vec<_> = projections
        .into_iter()
        .filter(|projection| args.projection == "all" || projection.name() == args.projection)
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = crm_projection_service::all_projections()
            .iter()
            .map(|p| p.name())
            .collect();
        bail!(
            "unknown projection `{}`; expected one of: all, {}",
            args.projection,
            names.join(", ")
        );
    }
    let (log, db) = match (&args.database_url, &args.read_database_url) {
        (_, None) => crate::stores::open(&args.data_dir, args.database_url.as_deref()).await?,
        (Some(log_url), Some(read_url)) => crate::stores::connect(log_url, read_url).await?,
        // Rebuilding beside an embedded log would fill a database no `crm
        // serve` reads from.
        (None, Some(_)) => bail!(
            "--read-database-url (CRM_READ_DATABASE_URL) needs --database-url \
             (CRM_DATABASE_URL): the embedded store keeps its read models beside its log"
        ),
    };
    // Stream-by-stream reads visit each page of the log many times; mapped,
    // it is not copied in again each time. This process exits when done.
    log.map_file_for_bulk_reads(LOG_MAP_BYTES);
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {pos}/{len} events  {per_sec}  ETA {eta}",
    )?
    .progress_chars("=> ");
    for projection in chosen {
        let bar = ProgressBar::new(0)
            .with_style(style.clone())
            .with_prefix(projection.name());
        let generation = crm_projection_service::rebuild::rebuild(
            &log,
            &db,
            projection.as_ref(),
            |position, head| {
                bar.set_length(head.max(0) as u64);
                bar.set_position(position.max(0) as u64);
            },
        )
        .await?;
        bar.finish();
        println!("{}: generation {generation} is serving", projection.name());
    }
    log.close().await;
    Ok(())
}
