//! The printed report: the machine, one table per comparison, each of our
//! figures as a ratio to its baseline, and every target met or missed.

use std::fmt::Write as _;

use crate::stats::RunResult;

/// A Markdown report assembled as the runs finish (printed as it grows so a
/// long run shows progress).
#[derive(Default)]
pub struct Report {
    text: String,
    targets: Vec<Target>,
}

/// One target of the benchmark issue, with the measured figure.
pub struct Target {
    pub what: String,
    pub measured: String,
    pub met: bool,
}

impl Report {
    pub fn heading(&mut self, title: &str) {
        self.emit(format!("\n## {title}\n"));
    }

    pub fn line(&mut self, line: impl Into<String>) {
        self.emit(line.into());
    }

    /// A table of runs: ops/s, latency percentiles, errors.
    pub fn runs(&mut self, runs: &[&RunResult]) {
        let mut table = String::from(
            "| run | ops | ops/s | p50 ms | p95 ms | p99 ms | max ms | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for run in runs {
            let _ = writeln!(
                table,
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                run.name,
                run.ops,
                run.rate(),
                run.p50_ms(),
                run.p95_ms(),
                run.p99_ms(),
                run.max_ms(),
                run.errors
            );
        }
        self.emit(table);
    }

    /// Records a target as met when `measured >= goal` (or `<=` when `at_most`).
    pub fn target(&mut self, what: &str, measured: f64, goal: f64, at_most: bool, unit: &str) {
        let met = if at_most {
            measured <= goal
        } else {
            measured >= goal
        };
        let measured = format!("{measured:.2}{unit}");
        self.emit(format!(
            "target: {what}: measured {measured} ({})",
            if met { "met" } else { "NOT met" }
        ));
        self.targets.push(Target {
            what: what.to_string(),
            measured,
            met,
        });
    }

    /// The closing table of targets.
    pub fn summary(&mut self) {
        let mut table = String::from("\n## Targets\n\n| target | measured | |\n|---|---:|---|\n");
        for target in &self.targets {
            let _ = writeln!(
                table,
                "| {} | {} | {} |",
                target.what,
                target.measured,
                if target.met { "met" } else { "**not met**" }
            );
        }
        self.emit(table);
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn emit(&mut self, chunk: String) {
        println!("{chunk}");
        self.text.push_str(&chunk);
        self.text.push('\n');
    }
}

/// Ratio `ours / baseline` (0 when the baseline measured nothing).
pub fn ratio(ours: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        ours / baseline
    } else {
        0.0
    }
}
