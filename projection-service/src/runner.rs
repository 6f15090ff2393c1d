//! Projection workers: follow the log, fold each new batch into every
//! projection's serving generation with its checkpoint, sleep when caught up,
//! wake on the log's head notification (with a polling fallback).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_eventlog::{EventLog, RecordedEvent};
use futures::StreamExt;
use tokio::sync::watch;

use crate::fold::{fold_or_stop, Advance};
use crate::projection::{Projection, ProjectionError};
use crate::readdb::{ReadBackend, ReadDb};
use crate::registry::{self, Generation};

/// How the runner paces itself.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Events folded per transaction.
    pub batch_size: i64,
    /// Longest sleep without a head notification before looking at the log again.
    pub poll_interval: Duration,
    /// How long a failed projection waits before it is tried again.
    pub retry_failed_after: Duration,
    /// Pause after each folded event (tests: makes "kill mid-batch" land mid-batch).
    pub pause_per_event: Option<Duration>,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            retry_failed_after: Duration::from_secs(60),
            pause_per_event: None,
        }
    }
}

/// Follows the log for a set of projections.
pub struct Runner {
    log: EventLog,
    db: ReadDb,
    projections: Vec<Arc<dyn Projection>>,
    settings: RunnerSettings,
}

impl Runner {
    pub fn new(
        log: EventLog,
        db: ReadDb,
        projections: Vec<Arc<dyn Projection>>,
        settings: RunnerSettings,
    ) -> Self {
        Self {
            log,
            db,
            projections,
            settings,
        }
    }

    /// Gives every projection a serving generation (see [`install`]); this
    /// runner folds in log order with one checkpoint per projection.
    pub async fn install(&self) -> Result<(), sqlx::Error> {
        install(&self.log, &self.db, &self.projections, Folding::InLogOrder).await
    }

    /// Runs until `shutdown` turns true; call [`Runner::install`] first. Never
    /// returns an error: a failing projection is recorded and skipped, the
    /// others keep going.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut head = self.log.subscribe();
        let mut last_collection: Option<Instant> = None;
        loop {
            // Garbage collection looks at the registry only: once a poll
            // interval is soon enough, and keeps it off the per-batch path.
            let collect =
                last_collection.is_none_or(|at| at.elapsed() >= self.settings.poll_interval);
            if collect {
                last_collection = Some(Instant::now());
            }
            if *shutdown.borrow() {
                return;
            }
            let progressed = self.round(collect).await;
            if progressed {
                continue;
            }
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// One round: every projection folds at most one batch; returns whether
    /// any folded something. Projections standing at the same checkpoint share
    /// one read of the log. On PostgreSQL the batches fold concurrently (each
    /// projection owns its tables and its checkpoint row, and their commits
    /// share WAL flushes); on SQLite in turn, as it has one writer and a
    /// waiting writer sleeps in steps of up to 100 ms.
    async fn round(&self, collect: bool) -> bool {
        if collect {
            for projection in &self.projections {
                if let Err(error) =
                    registry::collect_garbage(&self.db, projection.as_ref(), false).await
                {
                    tracing::warn!(projection = projection.name(), %error, "dropping retired generations failed");
                }
            }
        }
        // One read of the registry for every projection's standing.
        let generations = match registry::all(&self.db).await {
            Ok(generations) => generations,
            Err(error) => {
                tracing::warn!(%error, "reading the projection registry failed");
                return false;
            }
        };
        let mut due = Vec::new();
        for projection in &self.projections {
            let active = generations
                .iter()
                .find(|g| g.name == projection.name() && g.state == registry::ACTIVE);
            match self.due(active).await {
                Ok(Some(generation)) => due.push((projection.as_ref(), generation)),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(projection = projection.name(), %error, "projection step failed")
                }
            }
        }
        let mut windows: HashMap<i64, Arc<Vec<RecordedEvent>>> = HashMap::new();
        let mut folds = Vec::new();
        for (projection, generation) in due {
            let events = match windows.get(&generation.checkpoint) {
                Some(events) => events.clone(),
                None => match self
                    .log
                    .read_all(generation.checkpoint, self.settings.batch_size)
                    .await
                {
                    Ok(events) => {
                        let events = Arc::new(events);
                        windows.insert(generation.checkpoint, events.clone());
                        events
                    }
                    Err(error) => {
                        tracing::warn!(projection = projection.name(), %error, "reading the log failed");
                        continue;
                    }
                },
            };
            if !events.is_empty() {
                folds.push(async move {
                    let outcome = self.fold(projection, &generation, &events).await;
                    (projection.name(), outcome)
                });
            }
        }
        let at_once = match self.db.backend {
            ReadBackend::Postgres => folds.len().max(1),
            ReadBackend::Sqlite => 1,
        };
        let mut outcomes = futures::stream::iter(folds).buffer_unordered(at_once);
        let mut progressed = false;
        while let Some((name, outcome)) = outcomes.next().await {
            match outcome {
                Ok(folded) => progressed |= folded > 0,
                Err(error) => tracing::warn!(projection = name, %error, "projection step failed"),
            }
        }
        progressed
    }

    /// Whether the serving generation folds this round: a failed one waits
    /// for its retry time, then its failure is cleared.
    async fn due(&self, active: Option<&Generation>) -> Result<Option<Generation>, sqlx::Error> {
        let Some(generation) = active else {
            return Ok(None);
        };
        if generation.is_failed() {
            if !generation.failed_long_enough(self.settings.retry_failed_after) {
                return Ok(None);
            }
            registry::clear_failure(&self.db, &generation.name, generation.generation).await?;
        }
        Ok(Some(generation.clone()))
    }

    async fn fold(
        &self,
        projection: &dyn Projection,
        generation: &Generation,
        events: &[RecordedEvent],
    ) -> Result<usize, sqlx::Error> {
        let Some(last) = events.last() else {
            return Ok(0);
        };
        let advance = Advance {
            name: &generation.name,
            generation: generation.generation,
            part: None,
            from: generation.checkpoint,
            to: last.position,
        };
        let pause = self.settings.pause_per_event;
        fold_or_stop(&self.db, projection, generation, events, advance, pause)
            .await
            .map_err(|failure| match failure.error {
                // Contention or a lost connection: the batch is retried as is.
                ProjectionError::Database(error) => error,
                other => sqlx::Error::Protocol(other.to_string()),
            })
    }
}

/// How the caller will follow the log after [`install`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folding {
    /// One process, every projection in log order ([`Runner`]).
    InLogOrder,
    /// Distributed workers ([`crate::worker`]); stream-local projections are
    /// split into this many partitions.
    Partitioned(u32),
    /// Installing only (`crm migrate`): generations stay as they are, split or not.
    Undecided,
}

/// Gives every projection a serving generation: a fresh install starts at
/// generation 1; a projection whose version changed is rebuilt into a new
/// generation first (the old one serves meanwhile). A generation that
/// partitioned workers split is rebuilt before a log-order runner follows it
/// (its partitions stand at different positions). Abandoned rebuilds are
/// collected only by the log-order runner: a worker starting must not drop a
/// `crm rebuild` that is running beside it.
pub async fn install(
    log: &EventLog,
    db: &ReadDb,
    projections: &[Arc<dyn Projection>],
    folding: Folding,
) -> Result<(), sqlx::Error> {
    registry::ensure(db).await?;
    for projection in projections {
        registry::collect_garbage(db, projection.as_ref(), folding == Folding::InLogOrder).await?;
        let active = registry::active(db, projection.name()).await?;
        let split = match &active {
            Some(active) => crate::partition::checkpoints(db, projection.name(), active.generation)
                .await?
                .first()
                .map(|first| first.parts),
            None => None,
        };
        let rebuild_reason = match (&active, folding, split) {
            (None, _, _) => {
                let generation = registry::create_generation(
                    db,
                    projection.as_ref(),
                    registry::BUILDING,
                    registry::Indexes::Now,
                )
                .await?;
                registry::activate(db, projection.name(), generation.generation).await?;
                None
            }
            (Some(active), _, _) if active.version != projection.version() => Some(format!(
                "version {} -> {}",
                active.version,
                projection.version()
            )),
            (Some(_), Folding::InLogOrder, Some(parts)) => Some(format!(
                "split into {parts} partitions by distributed workers"
            )),
            (Some(active), Folding::Partitioned(want), Some(had)) if had != i64::from(want) => {
                return Err(sqlx::Error::Protocol(format!(
                    "projection {} (generation {}) is split into {had} partitions, this worker \
                     was started with {want}: stop every worker, run `crm rebuild {}`, then \
                     start the workers with the new count",
                    projection.name(),
                    active.generation,
                    projection.name()
                )));
            }
            (Some(active), _, _) => {
                if active.is_failed() {
                    // A restart is a retry: the failure may have been transient.
                    registry::clear_failure(db, projection.name(), active.generation).await?;
                }
                None
            }
        };
        if let Some(reason) = rebuild_reason {
            tracing::info!(projection = projection.name(), %reason, "rebuilding the projection");
            crate::rebuild::rebuild(log, db, projection.as_ref(), |_, _| {})
                .await
                .map_err(|error| sqlx::Error::Protocol(error.to_string()))?;
        }
    }
    Ok(())
}
