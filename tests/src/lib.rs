//! Harness for end-to-end tests: starts the real `crm` binary as a child
//! process on a fresh data dir (SQLite) or a fresh PostgreSQL database, and
//! talks to it over HTTP on a real socket.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use crm_eventlog::testing::PgTestDb;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub mod private;

/// Which event log the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Path of the `crm` binary cargo built next to this test executable.
pub fn crm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CRM_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/crm
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let binary = profile_dir.join(format!("crm{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: run the whole suite with `cargo test --workspace` (it builds the binary)",
        binary.display()
    );
    binary
}

/// A running `crm serve`.
pub struct Server {
    child: Child,
    pub base_url: String,
    pub data_dir: TempDir,
    pub stdout_lines: Vec<String>,
    database_url: Option<String>,
    pg: Option<PgTestDb>,
    pub http: reqwest::Client,
    pub admin_token: String,
}

impl Server {
    /// Starts a server on `backend`; None only when PostgreSQL is unreachable
    /// outside CI (in CI that panics, naming the service).
    pub async fn start(backend: Backend) -> Option<Server> {
        Self::start_with_env(backend, &[]).await
    }

    async fn spawn(
        data_dir: TempDir,
        database_url: Option<String>,
        pg: Option<PgTestDb>,
    ) -> anyhow::Result<Server> {
        Self::spawn_with_env(data_dir, database_url, pg, &[]).await
    }

    /// A token from `crm token issue`, signed with this server's secret.
    pub async fn token(&self, actor: &str, role: &str) -> anyhow::Result<String> {
        let output = Command::new(crm_binary())
            .args([
                "token",
                "issue",
                "--actor",
                actor,
                "--role",
                role,
                "--data-dir",
            ])
            .arg(self.data_dir.path())
            .env_remove("CRM_TOKEN_SECRET")
            .output()
            .await?;
        if !output.status.success() {
            bail!(
                "crm token issue failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?.trim().to_string())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Sends `body` with the admin token.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> Reply {
        self.request(method, path, &self.admin_token, |request| {
            request.json(body)
        })
        .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(reqwest::Method::POST, path, body).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(reqwest::Method::GET, path, &self.admin_token, |request| {
            request
        })
        .await
    }

    /// Any request: `build` adds body and headers.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Reply {
        let request = self.http.request(method, self.url(path)).bearer_auth(token);
        let response = build(request).send().await.expect("the server answers");
        Reply::read(response).await
    }

    /// Position of the newest event in the log.
    pub async fn head(&self) -> i64 {
        let reply = self.get("/readyz").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.body["head_position"].as_i64().expect("head_position")
    }

    /// The raw events of one stream.
    pub async fn events(&self, stream_type: &str, id: &str) -> Vec<Value> {
        let reply = self
            .get(&format!("/v1/streams/{stream_type}/{id}/events?limit=1000"))
            .await;
        if reply.status == 404 {
            return Vec::new();
        }
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.body["events"].as_array().cloned().unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("crm serve stops within 30 s of SIGTERM")
            .expect("exit status")
    }

    /// Resident memory of the `crm serve` process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("crm serve is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("/proc/<pid>/status of crm serve");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Stops and starts again on the same data.
    pub async fn restart(mut self) -> Server {
        let status = self.stop().await;
        assert!(status.success(), "crm serve exited with {status}");
        let token = std::mem::take(&mut self.admin_token);
        let mut next = Self::spawn(self.data_dir, self.database_url.take(), self.pg.take())
            .await
            .expect("crm serve restarts");
        next.admin_token = token;
        next
    }

    /// Stops the server and drops its PostgreSQL database, if any.
    pub async fn finish(mut self) {
        self.stop().await;
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
    }
}

/// Status, headers and decoded body of a response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The `id` of a command answer.
    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {self:?}"))
            .to_string()
    }

    /// Asserts a problem+json answer with `status` and returns the fields at fault.
    pub fn problem(&self, status: u16) -> Vec<String> {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert_eq!(self.body["status"], status, "{self:?}");
        assert!(
            self.body["title"].is_string()
                && self.body["type"].is_string()
                && self.body["detail"].is_string()
        );
        self.body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e["field"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Additions for crash and rebuild tests: extra environment for the child,
/// SIGKILL, restarting on the same data with other settings, running other
/// `crm` subcommands on the server's data, and reads that page or wait.
impl Server {
    /// Like [`Server::start`], with extra environment variables for
    /// `crm serve` (e.g. `CRM_PROJECTION_BATCH`, `CRM_PROJECTION_PAUSE_MS`).
    pub async fn start_with_env(backend: Backend, env: &[(&str, &str)]) -> Option<Server> {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let (pg, database_url) = match backend {
            Backend::Sqlite => (None, None),
            Backend::Postgres => {
                let db = PgTestDb::create().await?;
                let url = db.url.clone();
                (Some(db), Some(url))
            }
        };
        let mut server = Self::spawn_with_env(data_dir, database_url, pg, env)
            .await
            .expect("crm serve starts");
        server.admin_token = server.token("test-admin", "admin").await.expect("token");
        Some(server)
    }

    /// [`Server::spawn`] with extra environment variables.
    async fn spawn_with_env(
        data_dir: TempDir,
        database_url: Option<String>,
        pg: Option<PgTestDb>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let mut command = Command::new(crm_binary());
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--http-addr")
            .arg("127.0.0.1:0")
            .env_remove("CRM_TOKEN_SECRET")
            .env_remove("CRM_DATABASE_URL")
            .env_remove("CRM_PROJECTION_BATCH")
            .env_remove("CRM_PROJECTION_PAUSE_MS")
            .env("CRM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = &database_url {
            command.env("CRM_DATABASE_URL", url);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().context("spawning crm serve")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut stdout_lines = Vec::new();
        let base_url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                stdout_lines.push(line.clone());
                if let Some(address) = line.strip_prefix("crm listening on ") {
                    return Ok(address.trim().to_string());
                }
            }
            bail!("crm serve exited before listening")
        })
        .await
        .context("crm serve did not start within 60 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            base_url,
            data_dir,
            stdout_lines,
            database_url,
            pg,
            http: reqwest::Client::new(),
            admin_token: String::new(),
        })
    }

    /// Kills the process with SIGKILL (no shutdown code runs) and waits for it.
    pub async fn kill9(&mut self) -> std::process::ExitStatus {
        self.child
            .start_kill()
            .expect("SIGKILL is delivered to crm serve");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("crm serve dies within 30 s of SIGKILL")
            .expect("exit status")
    }

    /// Starts `crm serve` again on the same data (dir and database) with
    /// `env` as its only extra environment (so knobs of the previous run are
    /// dropped). A process still running is stopped with SIGTERM first; one
    /// already dead (e.g. after [`Server::kill9`]) is just replaced.
    pub async fn respawn(mut self, env: &[(&str, &str)]) -> Server {
        if self.child.try_wait().expect("child status").is_none() {
            let status = self.stop().await;
            assert!(status.success(), "crm serve exited with {status}");
        }
        let token = std::mem::take(&mut self.admin_token);
        let mut next =
            Self::spawn_with_env(self.data_dir, self.database_url.take(), self.pg.take(), env)
                .await
                .expect("crm serve starts again");
        next.admin_token = token;
        next
    }

    /// The PostgreSQL URL the server runs on (None on SQLite).
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// Runs `crm <args> --data-dir <this server's dir>` to completion, on
    /// this server's database (`CRM_DATABASE_URL` on PostgreSQL), e.g.
    /// `server.crm(&["rebuild", "all"])`.
    pub async fn crm(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(crm_binary());
        command
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .env_remove("CRM_TOKEN_SECRET")
            .env_remove("CRM_DATABASE_URL")
            .env_remove("CRM_DATA_DIR")
            .env("CRM_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(url) = &self.database_url {
            command.env("CRM_DATABASE_URL", url);
        }
        tokio::time::timeout(Duration::from_secs(300), command.output())
            .await
            .unwrap_or_else(|_| panic!("crm {args:?} did not finish within 300 s"))
            .unwrap_or_else(|error| panic!("running crm {args:?}: {error}"))
    }

    /// GET `path` with `min_position=position` added. A 503 (the read model
    /// has not reached the position yet) is retried for up to `timeout`;
    /// any other answer is returned as is.
    pub async fn get_at(&self, path: &str, position: i64, timeout: Duration) -> Reply {
        let separator = if path.contains('?') { '&' } else { '?' };
        let full = format!("{path}{separator}min_position={position}");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let reply = self.get(&full).await;
            if reply.status != 503 || tokio::time::Instant::now() >= deadline {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every item of a cursor-paginated list (`{items, next_cursor}`), read
    /// at `min_position=position`, following `next_cursor` to the end.
    pub async fn get_all_pages(&self, path: &str, position: i64) -> Vec<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100_000 {
            let page_path = match &cursor {
                None => path.to_string(),
                Some(cursor) => {
                    let separator = if path.contains('?') { '&' } else { '?' };
                    format!("{path}{separator}cursor={cursor}")
                }
            };
            let reply = self
                .get_at(&page_path, position, Duration::from_secs(60))
                .await;
            assert_eq!(reply.status, 200, "GET {page_path}: {reply:?}");
            items.extend(reply.body["items"].as_array().cloned().unwrap_or_default());
            match reply.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return items,
            }
        }
        panic!("GET {path}: more than 100000 pages");
    }

    /// `GET /v1/projections`: one status object per live generation.
    pub async fn projections(&self) -> Vec<Value> {
        let reply = self.get("/v1/projections").await;
        assert_eq!(reply.status, 200, "GET /v1/projections: {reply:?}");
        reply.body["projections"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("no projections array in {reply:?}"))
    }
}

/// One `crm` service process of the distributed mode (`command-service`,
/// `projection-service`, `query-service`), started with the given environment.
pub struct Service {
    child: Child,
    pub base_url: String,
}

impl Service {
    /// Runs `crm <subcommand>` on 127.0.0.1:0 and waits for its "listening on" line.
    pub async fn spawn(subcommand: &str, env: &[(&str, &str)]) -> anyhow::Result<Service> {
        let mut command = Command::new(crm_binary());
        command
            .arg(subcommand)
            .env("CRM_HTTP_ADDR", "127.0.0.1:0")
            .env("CRM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning crm {subcommand}"))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let base_url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, address)) = line.split_once(" listening on ") {
                    return Ok(address.trim().to_string());
                }
            }
            bail!("crm {subcommand} exited before listening")
        })
        .await
        .with_context(|| format!("crm {subcommand} did not start within 60 s"))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Service { child, base_url })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// SIGKILL (no shutdown code runs), then the exit status (bounded).
    pub async fn kill9(mut self) -> std::process::ExitStatus {
        self.child
            .start_kill()
            .expect("SIGKILL is delivered to the service");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the service dies within 30 s of SIGKILL")
            .expect("exit status")
    }

    /// SIGTERM, then the exit status (bounded).
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the service stops within 30 s of SIGTERM")
            .expect("exit status")
    }
}
