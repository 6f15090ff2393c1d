//! Opening the stores a process works on: the event log and the read-model
//! database, embedded (SQLite files in the data dir) or on PostgreSQL.

use std::path::Path;

use anyhow::Context;
use crm_eventlog::EventLog;
use crm_projection_service::ReadDb;

/// File of the embedded event log inside the data dir.
pub const LOG_FILE: &str = "crm.db";
/// File of the embedded read models inside the data dir.
pub const READ_FILE: &str = "read-models.db";

/// The log and the read models: both in `database_url` when given (one
/// PostgreSQL database holds both), else SQLite files in `data_dir`.
pub async fn open(
    data_dir: &Path,
    database_url: Option<&str>,
) -> anyhow::Result<(EventLog, ReadDb)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    Ok(match database_url {
        Some(url) => connect(url, url).await?,
        None => (
            EventLog::open_sqlite(&data_dir.join(LOG_FILE))
                .await
                .context("opening the embedded event log")?,
            ReadDb::open_sqlite(&data_dir.join(READ_FILE))
                .await
                .context("opening the embedded read models")?,
        ),
    })
}

/// The log at `log_url` and the read models at `read_url` (PostgreSQL, or
/// wherever the URLs point).
pub async fn connect(log_url: &str, read_url: &str) -> anyhow::Result<(EventLog, ReadDb)> {
    Ok((
        EventLog::connect(log_url)
            .await
            .context("connecting to the event log")?,
        ReadDb::connect(read_url)
            .await
            .context("connecting to the read-model database")?,
    ))
}
