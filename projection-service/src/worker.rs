//! Distributed projection workers (`crm projection-service`). The work is cut
//! into units: one per stream partition (hash of the stream) for the
//! stream-local read models, one `global` unit for the read models that need
//! log order across streams. Each unit is owned by one worker at a time
//! ([`crate::lease`]; workers rebalance as they come and go), is fed by its
//! durable JetStream consumer ([`crate::bus`]) and is checked against the log:
//! a batch folds only events contiguous with the unit's checkpoint, anything
//! the bus did not bring is read from the log, so NATS is never the only copy.
//! Checkpoints move by compare-and-set with the rows, so two workers can never
//! both commit the same range, even around a lease handover.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crm_eventlog::{EventLog, RecordedEvent};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bus::{self, BusSettings, Delivered, UnitConsumer};
use crate::fold::{fold_or_stop, Advance, FoldFailure};
use crate::lease::{fair_share, Leases};
use crate::partition::{self, partition_of};
use crate::projection::{Projection, ProjectionError};
use crate::readdb::{is_transient, ReadBackend, ReadDb};
use crate::registry::{self, Generation};
use crate::runner::{install, Folding};

/// How workers split and pace the work.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Stream partitions of the stream-local read models (the same on every
    /// worker of a deployment; changing it needs a rebuild).
    pub partitions: u32,
    /// Events per transaction and per bus batch.
    pub batch_size: i64,
    /// Longest wait for the bus (or, without it, for a head notification)
    /// before the log is read anyway.
    pub poll_interval: Duration,
    /// How often a worker counts its peers and takes or gives back units.
    pub rebalance_interval: Duration,
    /// How long a failed projection waits before it is tried again.
    pub retry_failed_after: Duration,
    /// Workers sharing units: their leases and consumer names derive from it.
    pub group: String,
    /// JetStream; None: follow the log only.
    pub bus: Option<BusSettings>,
    /// Pause after each folded event (tests: makes a kill land mid-batch).
    pub pause_per_event: Option<Duration>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            partitions: 4,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            rebalance_interval: Duration::from_secs(1),
            retry_failed_after: Duration::from_secs(60),
            group: "crm".into(),
            bus: None,
            pause_per_event: None,
        }
    }
}

/// The unit of the read models that need log order across streams.
const GLOBAL: &str = "global";

/// A share of the work one worker owns at a time.
#[derive(Clone)]
struct Unit {
    /// `p<k>` or `global`: lease and consumer names.
    name: String,
    part: Option<u32>,
    projections: Vec<Arc<dyn Projection>>,
}

/// The projections of a deployment, split into units.
fn units(projections: &[Arc<dyn Projection>], parts: u32) -> Vec<Unit> {
    let (local, global): (Vec<_>, Vec<_>) = projections
        .iter()
        .cloned()
        .partition(|projection| projection.stream_local());
    let mut units: Vec<Unit> = (0..parts)
        .filter(|_| !local.is_empty())
        .map(|part| Unit {
            name: format!("p{part}"),
            part: Some(part),
            projections: local.clone(),
        })
        .collect();
    if !global.is_empty() {
        units.push(Unit {
            name: GLOBAL.into(),
            part: None,
            projections: global,
        });
    }
    units
}

/// Everything the unit tasks of one worker share.
struct Shared {
    log: EventLog,
    db: ReadDb,
    settings: WorkerSettings,
    nats: Mutex<Option<async_nats::Client>>,
}

/// One projection worker process.
pub struct Worker {
    shared: Arc<Shared>,
    projections: Vec<Arc<dyn Projection>>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Worker {
    pub fn new(
        log: EventLog,
        db: ReadDb,
        projections: Vec<Arc<dyn Projection>>,
        settings: WorkerSettings,
    ) -> Self {
        let settings = WorkerSettings {
            partitions: settings.partitions.max(1),
            ..settings
        };
        Self {
            shared: Arc::new(Shared {
                log,
                db,
                settings,
                nats: Mutex::new(None),
            }),
            projections,
        }
    }

    /// Installs (or upgrades) the projections, one worker at a time.
    pub async fn install(&self) -> Result<(), sqlx::Error> {
        let shared = &self.shared;
        let folding = Folding::Partitioned(shared.settings.partitions);
        if shared.db.backend == ReadBackend::Sqlite {
            return install(&shared.log, &shared.db, &self.projections, folding).await;
        }
        let mut leases = Leases::connect(&shared.db.url, &shared.settings.group)
            .await
            .map_err(|error| sqlx::Error::Protocol(error.to_string()))?;
        leases
            .begin_install()
            .await
            .map_err(|error| sqlx::Error::Protocol(error.to_string()))?;
        let installed = install(&shared.log, &shared.db, &self.projections, folding).await;
        leases.close().await;
        installed
    }

    /// Takes a fair share of the units and works on them until `shutdown`;
    /// call [`Worker::install`] first. On SQLite (one process) it owns all.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let units = units(&self.projections, self.shared.settings.partitions);
        let offset = uuid::Uuid::new_v4().as_u128() as usize % units.len().max(1);
        let mut owned: BTreeMap<String, Running> = BTreeMap::new();
        let mut leases: Option<Leases> = None;
        while !*shutdown.borrow() {
            if let Err(error) = self
                .rebalance(&units, offset, &mut owned, &mut leases)
                .await
            {
                tracing::warn!(%error, "projection worker lost its leases; stopping its units");
                stop_all(&mut owned).await;
                if let Some(leases) = leases.take() {
                    leases.close().await;
                }
            }
            metrics::gauge!("crm_projection_units_owned").set(owned.len() as f64);
            if owned.contains_key(GLOBAL) {
                self.collect_garbage().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.shared.settings.rebalance_interval) => {}
                _ = shutdown.changed() => {}
            }
        }
        stop_all(&mut owned).await;
        if let Some(leases) = leases {
            leases.close().await;
        }
    }

    /// Drops the tables of generations a rebuild retired (the worker holding
    /// the global unit does it, so one worker per deployment).
    async fn collect_garbage(&self) {
        for projection in &self.projections {
            if let Err(error) =
                registry::collect_garbage(&self.shared.db, projection.as_ref(), false).await
            {
                tracing::debug!(projection = projection.name(), %error, "dropping retired generations failed");
            }
        }
    }

    async fn rebalance(
        &self,
        units: &[Unit],
        offset: usize,
        owned: &mut BTreeMap<String, Running>,
        leases: &mut Option<Leases>,
    ) -> Result<(), crate::lease::LeaseError> {
        // A unit task that ended (it never should) is started again.
        owned.retain(|_, running| !running.task.is_finished());
        if self.shared.db.backend == ReadBackend::Sqlite {
            for unit in units {
                if !owned.contains_key(&unit.name) {
                    owned.insert(unit.name.clone(), self.start(unit.clone()));
                }
            }
            return Ok(());
        }
        if leases.is_none() {
            *leases =
                Some(Leases::connect(&self.shared.db.url, &self.shared.settings.group).await?);
        }
        let Some(lease) = leases.as_mut() else {
            return Ok(());
        };
        lease.check().await?;
        let share = fair_share(units.len(), lease.live_workers().await?);
        while owned.len() > share {
            let Some((name, running)) = owned.pop_last() else {
                break;
            };
            stop(running).await;
            lease.give_back(&name).await?;
            tracing::info!(unit = %name, "unit handed over (a worker joined)");
        }
        for index in 0..units.len() {
            if owned.len() >= share {
                break;
            }
            let unit = &units[(index + offset) % units.len()];
            if owned.contains_key(&unit.name) || !lease.try_take(&unit.name).await? {
                continue;
            }
            tracing::info!(unit = %unit.name, "unit taken");
            owned.insert(unit.name.clone(), self.start(unit.clone()));
        }
        Ok(())
    }

    fn start(&self, unit: Unit) -> Running {
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(run_unit(self.shared.clone(), unit, stopping));
        Running { stop, task }
    }
}

async fn stop(running: Running) {
    let _ = running.stop.send(true);
    if let Err(error) = running.task.await {
        tracing::error!(%error, "projection unit task ended abnormally");
    }
}

async fn stop_all(owned: &mut BTreeMap<String, Running>) {
    while let Some((_, running)) = owned.pop_first() {
        stop(running).await;
    }
}

/// Where one projection of a unit stands.
struct Standing {
    projection: Arc<dyn Projection>,
    generation: Generation,
    part: Option<u32>,
    from: i64,
}

/// How long a unit waits before it tries to reopen its consumer.
const BUS_RETRY: Duration = Duration::from_secs(2);

async fn run_unit(shared: Arc<Shared>, unit: Unit, mut stop: watch::Receiver<bool>) {
    let settings = &shared.settings;
    let batch = usize::try_from(settings.batch_size.max(1)).unwrap_or(500);
    let mut consumer: Option<UnitConsumer> = None;
    let mut bus_retry_at = Instant::now();
    let mut head = shared.log.subscribe();
    let mut behind = false;
    // Bus messages ahead of the checkpoint, kept (unacknowledged) while the
    // log fills the hole before them, so the bus can take over again after.
    let mut delivered: Vec<Delivered> = Vec::new();
    loop {
        if *stop.borrow() {
            return;
        }
        if consumer.is_none() && Instant::now() >= bus_retry_at {
            if let Some(bus_settings) = &settings.bus {
                match open_consumer(&shared, bus_settings, &unit.name, batch).await {
                    Ok(opened) => consumer = Some(opened),
                    Err(error) => {
                        tracing::warn!(unit = %unit.name, %error, "JetStream unavailable; following the log");
                        bus_retry_at = Instant::now() + BUS_RETRY;
                    }
                }
            }
        }
        let standings = match standings(&shared, &unit).await {
            Ok(standings) => standings,
            Err(error) => {
                tracing::warn!(unit = %unit.name, %error, "reading the unit's checkpoints failed");
                pause(settings.poll_interval, &mut stop).await;
                continue;
            }
        };
        let Some(start) = standings.iter().map(|standing| standing.from).min() else {
            pause(settings.poll_interval, &mut stop).await;
            continue;
        };
        let fetched = match consumer.as_mut() {
            Some(_) if delivered.len() >= batch => Vec::new(),
            Some(open) => {
                let wait = if behind || !delivered.is_empty() {
                    Duration::ZERO
                } else {
                    settings.poll_interval
                };
                tokio::select! {
                    next = open.next_batch(wait, batch) => match next {
                        Ok(fetched) => fetched,
                        Err(error) => {
                            tracing::warn!(unit = %unit.name, %error, "JetStream consumer failed; following the log");
                            consumer = None;
                            bus_retry_at = Instant::now() + BUS_RETRY;
                            Vec::new()
                        }
                    },
                    _ = stop.changed() => return,
                }
            }
            None => Vec::new(),
        };
        delivered.extend(fetched);
        let mut window = contiguous(&delivered, start);
        let mut from_log = 0;
        if window.is_empty() {
            // Nothing from the bus continues the checkpoint: read the log, up
            // to the first event the bus brought when it skipped ahead (a
            // redelivery pending, a lost message, a consumer created late),
            // then go on with the bus's events after the hole.
            let ahead = delivered
                .iter()
                .filter_map(|d| d.event.as_ref())
                .map(|event| event.position)
                .filter(|position| *position > start)
                .min();
            if ahead.is_some() {
                metrics::counter!("crm_projection_bus_gaps_total").increment(1);
            }
            let limit = ahead.map_or(settings.batch_size, |first| {
                (first - start - 1).min(settings.batch_size)
            });
            head.borrow_and_update();
            window = match shared.log.read_all(start, limit).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(unit = %unit.name, %error, "reading the log failed");
                    pause(settings.poll_interval, &mut stop).await;
                    continue;
                }
            };
            from_log = window.len();
            if let Some(last) = window.last().map(|event| event.position) {
                window.extend(contiguous(&delivered, last));
            }
        }
        let from_bus = window.len() - from_log;
        behind = from_log >= batch;
        if window.is_empty() {
            delivered = acknowledge_up_to(delivered, start).await;
            settle(&shared, &standings).await;
            if consumer.is_none() {
                tokio::select! {
                    _ = head.changed() => {}
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                    _ = stop.changed() => {}
                }
            }
            continue;
        }
        metrics::counter!("crm_projection_window_events_total", "source" => "nats")
            .increment(from_bus as u64);
        metrics::counter!("crm_projection_window_events_total", "source" => "log")
            .increment(from_log as u64);
        for standing in &standings {
            fold_standing(&shared, standing, &window).await;
        }
        let end = window.last().map_or(start, |event| event.position);
        delivered = acknowledge_up_to(delivered, end).await;
    }
}

async fn open_consumer(
    shared: &Shared,
    settings: &BusSettings,
    unit: &str,
    batch: usize,
) -> Result<UnitConsumer, bus::BusError> {
    let client = {
        let mut nats = shared.nats.lock().await;
        match nats.as_ref() {
            Some(client) => client.clone(),
            None => {
                let client = bus::connect(settings).await?;
                *nats = Some(client.clone());
                client
            }
        }
    };
    UnitConsumer::open(&client, settings, unit, batch).await
}

/// The bus's events that continue the log right after `start`, in order
/// (redeliveries and already folded positions dropped; stops at a hole).
fn contiguous(delivered: &[Delivered], start: i64) -> Vec<RecordedEvent> {
    let mut events: Vec<&RecordedEvent> = delivered
        .iter()
        .filter_map(|delivered| delivered.event.as_ref())
        .filter(|event| event.position > start)
        .collect();
    events.sort_by_key(|event| event.position);
    events.dedup_by_key(|event| event.position);
    events
        .into_iter()
        .enumerate()
        .take_while(|(index, event)| event.position == start + 1 + *index as i64)
        .map(|(_, event)| event.clone())
        .collect()
}

/// Acknowledges the messages at or before `position` (and undecodable ones);
/// returns the rest, still to be folded.
async fn acknowledge_up_to(delivered: Vec<Delivered>, position: i64) -> Vec<Delivered> {
    let mut ahead = Vec::new();
    for message in delivered {
        match &message.event {
            Some(event) if event.position > position => ahead.push(message),
            _ => message.ack().await,
        }
    }
    ahead
}

async fn pause(duration: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = stop.changed() => {}
    }
}

/// Where each projection of the unit stands; partitions a generation that is
/// not split yet (fresh install, or a rebuild switched to a new one).
async fn standings(shared: &Shared, unit: &Unit) -> Result<Vec<Standing>, sqlx::Error> {
    let parts = shared.settings.partitions;
    let mut standings = Vec::new();
    for projection in &unit.projections {
        let Some(generation) = registry::active(&shared.db, projection.name()).await? else {
            continue;
        };
        if generation.is_failed() {
            if !generation.failed_long_enough(shared.settings.retry_failed_after) {
                continue;
            }
            registry::clear_failure(&shared.db, &generation.name, generation.generation).await?;
        }
        let from = match unit.part {
            None => generation.checkpoint,
            Some(part) => {
                let mut split =
                    partition::checkpoints(&shared.db, &generation.name, generation.generation)
                        .await?;
                if split.is_empty() {
                    partition::split(
                        &shared.db,
                        &generation.name,
                        generation.generation,
                        parts,
                        generation.checkpoint,
                    )
                    .await?;
                    split =
                        partition::checkpoints(&shared.db, &generation.name, generation.generation)
                            .await?;
                }
                let mine = split.iter().find(|row| row.part == i64::from(part));
                match mine {
                    Some(row) if row.parts == i64::from(parts) => row.checkpoint,
                    _ => {
                        tracing::error!(
                            projection = projection.name(),
                            generation = generation.generation,
                            partitions = parts,
                            "generation is split differently; rebuild it (crm rebuild)"
                        );
                        continue;
                    }
                }
            }
        };
        standings.push(Standing {
            projection: projection.clone(),
            generation,
            part: unit.part,
            from,
        });
    }
    Ok(standings)
}

/// Idle: lets the serving position of split generations catch up with their
/// partitions (two partitions committing together may have left it low).
async fn settle(shared: &Shared, standings: &[Standing]) {
    for standing in standings.iter().filter(|standing| standing.part == Some(0)) {
        let generation = &standing.generation;
        if let Err(error) =
            partition::refresh_serving(&shared.db, &generation.name, generation.generation).await
        {
            tracing::debug!(%error, "settling the serving position failed");
        }
    }
}

/// Folds the window's events of this projection (and partition) past its
/// checkpoint, moving the checkpoint to the window's end.
async fn fold_standing(shared: &Shared, standing: &Standing, window: &[RecordedEvent]) {
    let Some(to) = window.last().map(|event| event.position) else {
        return;
    };
    if to <= standing.from {
        return;
    }
    let parts = shared.settings.partitions;
    let mine = |event: &&RecordedEvent| {
        event.position > standing.from
            && standing
                .part
                .is_none_or(|part| partition_of(event, parts) == part)
    };
    let events: Vec<RecordedEvent> = window.iter().filter(mine).cloned().collect();
    let generation = &standing.generation;
    let projection = standing.projection.as_ref();
    let advance = Advance {
        name: &generation.name,
        generation: generation.generation,
        part: standing.part.map(i64::from),
        from: standing.from,
        to,
    };
    let pause = shared.settings.pause_per_event;
    match fold_or_stop(&shared.db, projection, generation, &events, advance, pause).await {
        Ok(_) => {}
        Err(FoldFailure {
            error: ProjectionError::CheckpointMoved { .. },
            ..
        }) => {
            tracing::info!(
                projection = projection.name(),
                "another worker folded this range; re-reading"
            );
        }
        Err(FoldFailure {
            error: ProjectionError::Database(error),
            ..
        }) if is_transient(&error) => {
            tracing::debug!(projection = projection.name(), %error, "transient read-model error; retrying");
        }
        Err(failure) => {
            tracing::warn!(projection = projection.name(), error = %failure.error, "folding a batch failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_local_projections_are_partitioned_the_rest_is_one_unit() {
        let units = units(&crate::all_projections(), 3);
        let names: Vec<&str> = units.iter().map(|unit| unit.name.as_str()).collect();
        assert_eq!(names, ["p0", "p1", "p2", "global"]);
        let global: Vec<&str> = units[3].projections.iter().map(|p| p.name()).collect();
        assert_eq!(global, ["history"]);
        assert_eq!(units[0].projections.len(), 4);
    }
}
