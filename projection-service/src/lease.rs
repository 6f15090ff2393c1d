//! Who works on what: projection workers sharing a PostgreSQL read database
//! own work units through session advisory locks, all held on one dedicated
//! connection per worker (a crashed worker's connection closes and its units
//! are free at once). Live workers are counted from `pg_stat_activity` by the
//! connection's application name, so no heartbeat table is needed.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// High half of every advisory-lock key taken here ("CRMP").
const KEY_CLASS: i64 = 0x4352_4D50;
/// Bound on each statement of the lease connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease connection: {0}")]
    Database(#[from] sqlx::Error),
    #[error("lease connection did not answer within {IO_TIMEOUT:?}")]
    TimedOut,
}

/// One worker's lease connection.
pub struct Leases {
    conn: PgConnection,
    group: String,
}

async fn timed<T>(
    future: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout(IO_TIMEOUT, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LeaseError::TimedOut),
    }
}

impl Leases {
    /// Opens the lease connection of a worker of `group` (workers of one
    /// deployment share a group; the name is at most 40 characters).
    pub async fn connect(url: &str, group: &str) -> Result<Self, LeaseError> {
        let options = PgConnectOptions::from_str(url)?
            .application_name(&application_name(group))
            .disable_statement_logging();
        let conn = timed(PgConnection::connect_with(&options)).await?;
        Ok(Self {
            conn,
            group: group.to_string(),
        })
    }

    /// Workers of this group connected to this database right now (this one included).
    pub async fn live_workers(&mut self) -> Result<i64, LeaseError> {
        timed(
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND datname = current_database()",
            )
            .bind(application_name(&self.group))
            .fetch_one(&mut self.conn),
        )
        .await
    }

    /// Takes `unit` if no other worker holds it.
    pub async fn try_take(&mut self, unit: &str) -> Result<bool, LeaseError> {
        timed(
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.key(unit))
                .fetch_one(&mut self.conn),
        )
        .await
    }

    /// Gives `unit` back (after its task stopped).
    pub async fn give_back(&mut self, unit: &str) -> Result<(), LeaseError> {
        let _: bool = timed(
            sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(self.key(unit))
                .fetch_one(&mut self.conn),
        )
        .await?;
        Ok(())
    }

    /// Waits for the group's installation lock (one worker installs or
    /// upgrades the projections at a time); released by [`Leases::end_install`].
    pub async fn begin_install(&mut self) -> Result<(), LeaseError> {
        let key = self.key("install");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    pub async fn end_install(&mut self) -> Result<(), LeaseError> {
        self.give_back("install").await
    }

    /// Fails when the connection is gone (PostgreSQL then freed every unit).
    pub async fn check(&mut self) -> Result<(), LeaseError> {
        timed(self.conn.ping()).await
    }

    /// Closes the connection, freeing every unit.
    pub async fn close(self) {
        drop(tokio::time::timeout(IO_TIMEOUT, self.conn.close()).await);
    }

    fn key(&self, unit: &str) -> i64 {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in self.group.bytes().chain([b':']).chain(unit.bytes()) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        (KEY_CLASS << 32) | i64::from(hash)
    }
}

fn application_name(group: &str) -> String {
    format!("crm-projections:{group}")
}

/// How many units each of `workers` live workers should hold (rounded up).
pub fn fair_share(units: usize, workers: i64) -> usize {
    let workers = usize::try_from(workers.max(1)).unwrap_or(1);
    units.div_ceil(workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_unit() {
        assert_eq!(fair_share(5, 1), 5);
        assert_eq!(fair_share(5, 2), 3);
        assert_eq!(fair_share(5, 5), 1);
        assert_eq!(fair_share(5, 9), 1);
        assert_eq!(fair_share(5, 0), 5);
    }
}
