//! Every benchmark scenario runs end to end in smoke mode (tiny runs, real
//! PostgreSQL and `crm serve` processes) and reports every run without errors.
//! Speed is not judged here; `crm-bench` without `--smoke` measures it.

use std::process::Command;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

#[test]
fn every_scenario_runs_and_reports_without_errors() {
    let output = Command::new(env!("CARGO_BIN_EXE_crm-bench"))
        .arg("--smoke")
        .output()
        .expect("crm-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("PostgreSQL is unreachable") && !in_ci() {
        eprintln!("\n!!!!! skipping: PostgreSQL unreachable !!!!!\n!!!!! (set CI=true to make this a failure) !!!!!\n");
        return;
    }
    assert!(
        output.status.success(),
        "crm-bench --smoke failed:\n{stdout}\n{stderr}"
    );
    for section in [
        "(a) Direct event-row inserts",
        "crm serve on PostgreSQL",
        "crm command-service alone on PostgreSQL",
        "direct insert, 1 row/tx, position from log_head",
        "reading the log alone as a rebuild does",
        "(b) Opportunity updates by stream length",
        "crm serve HTTP, 10 events/stream",
        "crm command-service alone HTTP, 10 events/stream",
        "crm command-service alone: commands/s vs cqrs-es at 10-event streams",
        "crm serve on embedded SQLite",
        "## Targets",
    ] {
        assert!(
            stdout.contains(section),
            "no `{section}` section in:\n{stdout}"
        );
    }
    // Every run row: | name | ops | ops/s | p50 | p95 | p99 | max | errors |
    let runs: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|line| {
            line.starts_with("| ") && !line.starts_with("| run ") && !line.starts_with("| target ")
        })
        .map(|line| {
            line.trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .filter(|cells| cells.len() == 8)
        .collect();
    assert!(
        runs.len() >= 17,
        "expected every run in the report, found {}:\n{stdout}",
        runs.len()
    );
    for cells in &runs {
        let ops: u64 = cells[1]
            .parse()
            .unwrap_or_else(|_| panic!("ops of {cells:?}"));
        assert!(ops > 0, "run {} did nothing:\n{stdout}", cells[0]);
        assert_eq!(
            cells[7], "0",
            "run {} had errors:\n{stdout}\n{stderr}",
            cells[0]
        );
    }
    let targets = stdout
        .lines()
        .filter(|line| line.starts_with("target: "))
        .count();
    assert!(
        targets >= 10,
        "expected every target judged, found {targets}:\n{stdout}"
    );
}
