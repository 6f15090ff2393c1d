//! The service under test: a real `crm serve` child process (embedded SQLite
//! or a throwaway PostgreSQL database), or `crm command-service` alone on
//! PostgreSQL; its admin token, HTTP client and RSS.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use crm_eventlog::testing::PgTestDb;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Which event log `crm serve` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// Which `crm` subcommand runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// `crm serve`: commands, projections and queries in one process.
    Serve,
    /// `crm command-service`: the command API alone, no read model folding
    /// beside it (PostgreSQL only).
    CommandService,
}

impl Process {
    fn subcommand(self) -> &'static str {
        match self {
            Process::Serve => "serve",
            Process::CommandService => "command-service",
        }
    }

    /// The line the process prints once it listens, before the address.
    fn listening(self) -> &'static str {
        match self {
            Process::Serve => "crm listening on ",
            Process::CommandService => "crm command-service listening on ",
        }
    }
}

/// The embedded log's file in a data directory (as `crm` names it in `crm/src/stores.rs`).
pub const LOG_FILE: &str = "crm.db";

/// Path of the `crm` binary: `$CRM_BIN`, or the one cargo built next to this
/// executable (so `cargo build --release -p crm -p crm-bench` pairs them).
pub fn crm_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CRM_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating crm-bench")?;
    let mut dir = exe.parent().context("crm-bench has no directory")?;
    // Test executables live one level down, in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir = dir.parent().context("target dir")?;
    }
    let binary = dir.join(format!("crm{}", std::env::consts::EXE_SUFFIX));
    if !binary.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p crm -p crm-bench`) or set CRM_BIN",
            binary.display()
        );
    }
    Ok(binary)
}

/// Where and as whom load clients talk to the service (cheap to clone).
#[derive(Clone)]
pub struct Target {
    pub base_url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Target {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    async fn send_get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))
    }

    /// GET `path` as JSON; a non-2xx answer is an error.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.send_get(path).await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// GET `path` and read its whole body, without parsing it: the query runs
    /// time the service to its answer's last byte. Parsing a 32 KB timeline
    /// page into a JSON tree is the client's own work, and on a 2-CPU machine
    /// it took the CPUs the service was being measured on. A non-2xx answer,
    /// or a body that is not a JSON object, is an error.
    pub async fn get_unparsed(&self, path: &str) -> anyhow::Result<()> {
        let response = self.send_get(path).await?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("GET {path}: reading the body"))?;
        if !status.is_success() {
            bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
        }
        if !(body.starts_with(b"{") && body.ends_with(b"}")) {
            bail!(
                "GET {path}: {status} with a body that is not a JSON object ({} bytes)",
                body.len()
            );
        }
        Ok(())
    }
}

/// A running `crm serve` (or `crm command-service`), stopped and cleaned up
/// by [`Server::finish`].
pub struct Server {
    child: Child,
    pub backend: Backend,
    process: Process,
    pub target: Target,
    data_dir: TempDir,
    secret: String,
    pg: Option<PgTestDb>,
}

impl Server {
    /// Starts `crm serve` on a fresh store.
    pub async fn start(backend: Backend) -> anyhow::Result<Server> {
        Self::start_as(backend, Process::Serve).await
    }

    /// Starts `crm command-service` alone on a fresh PostgreSQL database.
    pub async fn start_command_service() -> anyhow::Result<Server> {
        Self::start_as(Backend::Postgres, Process::CommandService).await
    }

    async fn start_as(backend: Backend, process: Process) -> anyhow::Result<Server> {
        anyhow::ensure!(
            process == Process::Serve || backend == Backend::Postgres,
            "crm command-service runs on PostgreSQL only"
        );
        let data_dir = tempfile::Builder::new()
            .prefix("crm-bench-")
            .tempdir()
            .context("creating a data dir")?;
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                PgTestDb::create()
                    .await
                    .context("PostgreSQL is unreachable (set CRM_TEST_PG_URL)")?,
            ),
        };
        let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let (child, base_url) = spawn(process, data_dir.path(), pg.as_ref(), &secret).await?;
        let token = issue_token(data_dir.path(), &secret).await?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()?;
        Ok(Server {
            child,
            backend,
            process,
            target: Target {
                base_url,
                token,
                http,
            },
            data_dir,
            secret,
            pg,
        })
    }

    /// Whether read models fold in this process (`crm serve`), so there is
    /// a projection status to wait on.
    pub fn folds(&self) -> bool {
        self.process == Process::Serve
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The PostgreSQL database the service runs on, if any.
    pub fn database_url(&self) -> Option<&str> {
        self.pg.as_ref().map(|db| db.url.as_str())
    }

    /// Refreshes PostgreSQL's planner statistics (`ANALYZE`) before a timed
    /// run, as autovacuum would on a production server: this one may run
    /// with autovacuum off (CI), and plans cached while the tables were
    /// nearly empty would otherwise outlive their growth (a stream read
    /// scanning every opportunity event was seen). No-op on SQLite.
    pub async fn analyze(&self) -> anyhow::Result<()> {
        let Some(url) = self.database_url() else {
            return Ok(());
        };
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(url)
            .await
            .context("connecting to run ANALYZE")?;
        sqlx::query("ANALYZE")
            .execute(&mut connection)
            .await
            .context("ANALYZE")?;
        connection.close().await.ok();
        Ok(())
    }

    /// Stops the process (SIGKILL: nothing left to flush that the log has not
    /// committed) and starts it again on the same store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("stopping crm serve")?;
        let (child, base_url) = spawn(
            self.process,
            self.data_dir.path(),
            self.pg.as_ref(),
            &self.secret,
        )
        .await?;
        self.child = child;
        self.target.base_url = base_url;
        Ok(())
    }

    /// Runs another `crm` subcommand against this server's store; its stdout.
    pub async fn crm(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new(crm_binary()?);
        command
            .args(args)
            .env("CRM_DATA_DIR", self.data_dir.path())
            .env_remove("CRM_DATABASE_URL")
            .stdin(Stdio::null());
        if let Some(db) = &self.pg {
            command.env("CRM_DATABASE_URL", &db.url);
        }
        let output = command.output().await.context("running crm")?;
        if !output.status.success() {
            bail!(
                "crm {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Resident and peak resident memory of the process, in MiB.
    pub fn memory_mib(&self) -> anyhow::Result<Memory> {
        let pid = self.pid().context("crm serve has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .context("reading /proc/<pid>/status (Linux only)")?;
        let field = |name: &str| -> anyhow::Result<f64> {
            let line = status
                .lines()
                .find(|line| line.starts_with(name))
                .with_context(|| format!("{name} missing from /proc/{pid}/status"))?;
            let kib: f64 = line
                .split_whitespace()
                .nth(1)
                .context("no value")?
                .parse()
                .context("not a number")?;
            Ok(kib / 1024.0)
        };
        Ok(Memory {
            rss_mib: field("VmRSS:")?,
            peak_rss_mib: field("VmHWM:")?,
        })
    }

    /// Stops the process and removes its store.
    pub async fn finish(mut self) {
        self.stop().await;
    }

    /// Stops the process and leaves its data directory (the embedded store)
    /// on disk; its path. A PostgreSQL database is dropped all the same.
    pub async fn keep_store(mut self) -> PathBuf {
        self.stop().await;
        self.data_dir.keep()
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
        if let Some(db) = self.pg.take() {
            db.drop_db().await;
        }
    }
}

/// Memory of a process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

async fn spawn(
    process: Process,
    data_dir: &Path,
    pg: Option<&PgTestDb>,
    secret: &str,
) -> anyhow::Result<(Child, String)> {
    let mut command = Command::new(crm_binary()?);
    command.arg(process.subcommand());
    if process == Process::Serve {
        command.arg("--data-dir").arg(data_dir);
    }
    command
        .arg("--http-addr")
        .arg("127.0.0.1:0")
        .env("CRM_TOKEN_SECRET", secret)
        .env_remove("CRM_DATABASE_URL")
        .env("CRM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(db) = pg {
        command.env("CRM_DATABASE_URL", &db.url);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning crm {}", process.subcommand()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let base_url = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = line.strip_prefix(process.listening()) {
                return Ok(address.trim().to_string());
            }
        }
        bail!("crm {} exited before listening", process.subcommand())
    })
    .await
    .with_context(|| format!("crm {} did not start within 600 s", process.subcommand()))??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, base_url))
}

async fn issue_token(data_dir: &Path, secret: &str) -> anyhow::Result<String> {
    let output = Command::new(crm_binary()?)
        .args(["token", "issue", "--actor", "crm-bench", "--role", "admin"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("CRM_TOKEN_SECRET", secret)
        .output()
        .await
        .context("running crm token issue")?;
    if !output.status.success() {
        bail!(
            "crm token issue failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
