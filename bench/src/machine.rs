//! A description of the machine and PostgreSQL a report was measured on.

use sqlx::Connection;

/// CPU model and count, memory, kernel, and the PostgreSQL settings that
/// decide durable-commit speed.
pub async fn describe(pg_url: &str) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let postgres = match postgres_settings(pg_url).await {
        Ok(settings) => settings,
        Err(error) => format!("PostgreSQL: unavailable ({error})"),
    };
    format!(
        "machine: {cpus} CPUs ({model}), {memory_gib:.0} GiB RAM, Linux {}; {postgres}",
        kernel.trim()
    )
}

async fn postgres_settings(pg_url: &str) -> anyhow::Result<String> {
    let mut conn = sqlx::PgConnection::connect(pg_url).await?;
    let mut parts = Vec::new();
    for setting in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "shared_buffers",
        "autovacuum",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&mut conn)
            .await?;
        parts.push(format!("{setting}={value}"));
    }
    Ok(format!("PostgreSQL local over TCP: {}", parts.join(", ")))
}
