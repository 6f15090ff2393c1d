//! Test support (cargo feature `testing`): throwaway PostgreSQL databases and SQLite temp files.

use sqlx::{Connection, PgConnection};

/// Admin URL used to create test databases (`CRM_TEST_PG_URL`, default local trust auth).
pub fn admin_url() -> String {
    std::env::var("CRM_TEST_PG_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A uniquely named PostgreSQL database for one test. Call [`PgTestDb::drop_db`]
/// at the end; if the test panics first, dropping the value removes the database.
#[derive(Debug)]
pub struct PgTestDb {
    /// Connection URL of the new database.
    pub url: String,
    /// Name of the new database.
    pub name: String,
    admin_url: String,
    dropped: bool,
}

/// Replaces the database name (URL path) of a postgres URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{}", &base[..authority_end], db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

impl PgTestDb {
    /// Creates `crm_test_<uuid>`. If PostgreSQL is unreachable: panics when `CI=true`,
    /// otherwise prints a loud warning and returns `None`.
    pub async fn create() -> Option<PgTestDb> {
        let admin_url = admin_url();
        let mut conn = match PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) => {
                if in_ci() {
                    panic!("PostgreSQL at {admin_url} is unreachable (CI=true, not skipping): {e}");
                }
                eprintln!(
                    "\n!!!!! skipping: PostgreSQL unreachable at {admin_url}: {e} !!!!!\n\
                     !!!!! (set CI=true to make this a failure) !!!!!\n"
                );
                return None;
            }
        };
        let name = format!("crm_test_{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
        {
            panic!("PostgreSQL at {admin_url}: CREATE DATABASE {name} failed: {e}");
        }
        drop(conn.close().await);
        Some(PgTestDb {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
            dropped: false,
        })
    }

    /// Drops the database (`WITH (FORCE)` disconnects leftover sessions).
    pub async fn drop_db(mut self) {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await;
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop may run inside a runtime (a panicking test), which must not block
        // on itself: do the work on a thread with a runtime of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let cleanup =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(drop_database(&admin_url, &name)),
                    Err(e) => eprintln!("warning: dropping test database {name}: {e}"),
                }
            });
        let _ = cleanup.join();
    }
}

async fn drop_database(admin_url: &str, name: &str) {
    match PgConnection::connect(admin_url).await {
        Ok(mut conn) => {
            let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            if let Err(e) = sqlx::query(&statement).execute(&mut conn).await {
                eprintln!("warning: dropping test database {name}: {e}");
            }
            drop(conn.close().await);
        }
        Err(e) => eprintln!("warning: dropping test database {name}: {e}"),
    }
}

/// A temp dir holding an SQLite event log file, and its `sqlite://` URL.
/// Keep the `TempDir` alive as long as the database is used.
pub fn sqlite_temp() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("create temp dir for sqlite event log");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    (dir, url)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
