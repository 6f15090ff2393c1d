//! Latency recording (HDR histograms, microseconds) and the summary every
//! scenario reports: operations, rate, p50/p95/p99/max.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies of one run, in microseconds (1 µs .. 60 s, 3 significant digits).
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    pub fn merge(&mut self, other: &Latencies) {
        self.0.add(&other.0).expect("histograms share bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at `quantile` (0..=1) in milliseconds.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        self.0.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }
}

/// What one measured run did: how many operations succeeded in how long,
/// their latencies, and how many failed (a failed operation is never counted
/// as throughput).
#[derive(Clone)]
pub struct RunResult {
    pub name: String,
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
}

impl RunResult {
    pub fn new(
        name: impl Into<String>,
        elapsed: Duration,
        latencies: Latencies,
        errors: u64,
    ) -> Self {
        Self {
            name: name.into(),
            ops: latencies.count(),
            errors,
            elapsed,
            latencies,
        }
    }

    /// Successful operations per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    pub fn p50_ms(&self) -> f64 {
        self.latencies.quantile_ms(0.50)
    }

    pub fn p95_ms(&self) -> f64 {
        self.latencies.quantile_ms(0.95)
    }

    pub fn p99_ms(&self) -> f64 {
        self.latencies.quantile_ms(0.99)
    }

    pub fn max_ms(&self) -> f64 {
        self.latencies.max_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rate_come_from_what_was_recorded() {
        let mut latencies = Latencies::default();
        for ms in 1..=100 {
            latencies.record(Duration::from_millis(ms));
        }
        let run = RunResult::new("x", Duration::from_secs(2), latencies, 3);
        assert_eq!(run.ops, 100);
        assert_eq!(run.errors, 3);
        assert!((run.rate() - 50.0).abs() < 1e-9);
        assert!((run.p50_ms() - 50.0).abs() < 0.1, "{}", run.p50_ms());
        assert!((run.p99_ms() - 99.0).abs() < 0.1, "{}", run.p99_ms());
        assert!((run.max_ms() - 100.0).abs() < 0.1, "{}", run.max_ms());
    }
}
