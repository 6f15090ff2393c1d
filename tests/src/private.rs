//! Private PostgreSQL and NATS servers for fault tests: each test that stops
//! or restarts a dependency gets its own instance (own port, own temp dir),
//! so the shared servers other tests use are never touched.
//!
//! * [`PrivatePostgres`]: `initdb` into a temp dir as user `postgres` (initdb
//!   refuses root), then `postgres -D <dir> -p <port>`; [`PrivatePostgres::stop`]
//!   is a fast shutdown (SIGINT), [`PrivatePostgres::start`] starts it again
//!   on the same port and data.
//! * [`PrivateNats`]: `nats-server -js -sd <dir>`; stop/start keep the port
//!   and the JetStream store, so streams survive a restart.
//!
//! Both kill their process and remove their directory on drop. A missing
//! binary panics when `CI=true` and otherwise skips (constructor returns
//! `None` after a loud notice), like the rest of the harness.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

/// The NATS server binary of the test machines.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// Where Debian/Ubuntu install PostgreSQL's server binaries (`<dir>/<version>/bin`).
pub const POSTGRES_LIB: &str = "/usr/lib/postgresql";

/// How long a private server may take to accept connections after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// True when `CI=true` (or `1`): missing tools are failures, not skips.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Panics in CI, otherwise prints a loud notice; the caller then skips.
fn missing(what: &str) {
    if in_ci() {
        panic!("{what} (CI=true, not skipping)");
    }
    eprintln!("\n!!!!! skipping: {what} !!!!!\n!!!!! (set CI=true to make this a failure) !!!!!\n");
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

/// Sends `signal` (e.g. "INT", "KILL") to `pid` with kill(1).
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `child` until it exits or `timeout` passes (None = still running).
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`wait_exit`], for `Drop`.
fn wait_exit_blocking(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a log file, for failure messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// uid and gid of a system user, from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == name {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `postgres`.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(POSTGRES_LIB)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A PostgreSQL server of its own: trust auth, user `postgres`, on
/// 127.0.0.1:[`PrivatePostgres::port`], data in a temp dir.
pub struct PrivatePostgres {
    dir: TempDir,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    port: u16,
    child: Option<Child>,
}

impl PrivatePostgres {
    /// initdb + start. None (after a notice) when PostgreSQL's server
    /// binaries or the `postgres` user are missing outside CI.
    pub async fn start_new() -> Option<PrivatePostgres> {
        let Some(bin) = postgres_bin_dir() else {
            missing(&format!(
                "no PostgreSQL server binaries (initdb, postgres) under {POSTGRES_LIB}/<version>/bin"
            ));
            return None;
        };
        let Some((uid, gid)) = user_ids("postgres") else {
            missing("no `postgres` system user to run a private PostgreSQL as");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("crm-private-pg-")
            .tempdir()
            .expect("temp dir");
        chown(dir.path(), Some(uid), Some(gid)).expect("chown the private PostgreSQL dir");
        let sockets = dir.path().join("sock");
        std::fs::create_dir(&sockets).expect("socket dir");
        chown(&sockets, Some(uid), Some(gid)).expect("chown the socket dir");
        let data = dir.path().join("data");
        let log = File::create(dir.path().join("initdb.log")).expect("initdb log");
        let initdb = tokio::process::Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .arg("--locale=C")
            .uid(uid)
            .gid(gid)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .status()
            .await
            .expect("running initdb");
        assert!(
            initdb.success(),
            "initdb failed ({initdb}):\n{}",
            log_tail(&dir.path().join("initdb.log"), 30)
        );
        let mut pg = PrivatePostgres {
            dir,
            bin,
            uid,
            gid,
            port: free_port(),
            child: None,
        };
        pg.start().await;
        Some(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the private PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        let _ = conn.close().await;
        self.url(name)
    }

    /// Starts the server (again) on the same port and data; returns once it
    /// accepts connections. Panics when it does not within a minute.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "the private PostgreSQL already runs");
        let log_path = self.dir.path().join("postgres.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("postgres log");
        let child = Command::new(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"])
            .args(["-c", "max_connections=200"])
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning postgres");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                PgConnection::connect(&self.url("postgres")),
            )
            .await;
            if let Ok(Ok(conn)) = attempt {
                let _ = conn.close().await;
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "the private PostgreSQL exited at start ({status}):\n{}",
                        log_tail(&log_path, 30)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "the private PostgreSQL on port {} did not accept connections within {READY_TIMEOUT:?}:\n{}",
                self.port,
                log_tail(&log_path, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fast shutdown (SIGINT: sessions are terminated, the data is
    /// checkpointed) and waits for the server to exit.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the private PostgreSQL runs");
        signal(child.id(), "INT");
        if wait_exit(&mut child, EXIT_TIMEOUT).await.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the private PostgreSQL did not stop within {EXIT_TIMEOUT:?} of SIGINT");
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the postmaster stops its backends and exits.
            signal(child.id(), "QUIT");
            if wait_exit_blocking(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // `dir` (a TempDir) removes the data on drop.
    }
}

/// A NATS server with JetStream of its own on 127.0.0.1:[`PrivateNats::port`].
pub struct PrivateNats {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PrivateNats {
    /// Starts `nats-server -js`. None (after a notice) when the binary is
    /// missing outside CI.
    pub async fn start_new() -> Option<PrivateNats> {
        if !Path::new(NATS_SERVER).exists() {
            missing(&format!("{NATS_SERVER} is not installed"));
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("crm-private-nats-")
            .tempdir()
            .expect("temp dir");
        let mut nats = PrivateNats {
            dir,
            port: free_port(),
            child: None,
        };
        nats.start().await;
        Some(nats)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server (again) on the same port and JetStream store;
    /// returns once a client can connect.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "the private NATS already runs");
        let log_path = self.dir.path().join("nats.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("nats log");
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("jetstream"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // The client port opens after JetStream is enabled.
            let attempt =
                tokio::time::timeout(Duration::from_secs(5), async_nats::connect(self.url())).await;
            if let Ok(Ok(client)) = attempt {
                drop(client);
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "the private NATS exited at start ({status}):\n{}",
                        log_tail(&log_path, 30)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "the private NATS on port {} was not ready within {READY_TIMEOUT:?}:\n{}",
                self.port,
                log_tail(&log_path, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server (SIGTERM) and waits for it to exit; the JetStream
    /// store stays for the next [`PrivateNats::start`].
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the private NATS runs");
        signal(child.id(), "TERM");
        if wait_exit(&mut child, EXIT_TIMEOUT).await.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the private NATS did not stop within {EXIT_TIMEOUT:?} of SIGTERM");
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_exit_blocking(&mut child, Duration::from_secs(10));
        }
    }
}
