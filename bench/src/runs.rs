//! The measured runs against a live service: closed-loop and paced command
//! load, projection lag, stream-length runs, paced queries and rebuilds.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use sqlx::Connection;
use tokio::sync::{watch, Mutex, Semaphore};

use crate::plan::{self, StreamPlan};
use crate::server::{Server, Target};
use crate::stats::{Latencies, RunResult};
use crate::workload::{send, Ack, Client, World};

/// What a command run produced: its summary and every acknowledgement.
pub struct Load {
    pub result: RunResult,
    pub acks: Vec<Ack>,
}

impl Load {
    /// The highest log position the run's commands reached.
    pub fn head(&self) -> i64 {
        self.acks.iter().map(|ack| ack.position).max().unwrap_or(0)
    }
}

/// What one load client hands back: itself (its records), its latencies,
/// acknowledgements and error count.
type ClientRun = (Client, Latencies, Vec<Ack>, u64);

/// Checkpoint samples: when each came back, and the lowest active checkpoint.
type Samples = Vec<(Instant, i64)>;

/// Clients that keep their records between runs (warm-up, measure, ...).
pub struct Fleet {
    clients: Vec<Client>,
}

impl Fleet {
    pub fn new(world: &Arc<World>, clients: usize, seed: u64) -> Self {
        Self {
            clients: (0..clients)
                .map(|n| Client::new(world.clone(), seed + n as u64))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Every client sends back to back for `duration` (closed loop).
    pub async fn closed_loop(
        &mut self,
        target: &Target,
        duration: Duration,
        name: &str,
    ) -> anyhow::Result<Load> {
        self.drive(target, Until::after(duration), None, name).await
    }

    /// Commands at `rate` per second in all, whatever the latency (open
    /// loop; a command waiting for a free client counts from its turn).
    pub async fn paced(
        &mut self,
        target: &Target,
        rate: f64,
        duration: Duration,
        name: &str,
    ) -> anyhow::Result<Load> {
        let pacer = spawn_pacer(rate, duration);
        self.drive(target, Until::after(duration), Some(pacer), name)
            .await
    }

    /// Sends until `events` events are in the log (closed loop); the load.
    pub async fn fill(&mut self, target: &Target, events: i64) -> anyhow::Result<Load> {
        let reached = Arc::new(AtomicI64::new(0));
        let until = Until::Head {
            reached: reached.clone(),
            events,
        };
        let load = self.drive(target, until, None, "fill").await?;
        anyhow::ensure!(
            reached.load(Ordering::Relaxed) >= events,
            "fill stopped early"
        );
        Ok(load)
    }

    async fn drive(
        &mut self,
        target: &Target,
        until: Until,
        pacer: Option<Arc<Pacer>>,
        name: &str,
    ) -> anyhow::Result<Load> {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for mut client in std::mem::take(&mut self.clients) {
            let target = target.clone();
            let pacer = pacer.clone();
            let until = until.clone();
            let label = name.to_string();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut acks = Vec::new();
                let mut errors = 0u64;
                loop {
                    let turn = match &pacer {
                        Some(pacer) => match pacer.take().await {
                            Some(turn) => turn,
                            None => break,
                        },
                        None => Instant::now(),
                    };
                    if until.reached() {
                        break;
                    }
                    match client.step(&target).await {
                        Ok(mut ack) => {
                            // Open loop: the wait for a free client is part of the latency.
                            ack.latency = ack.acked_at.saturating_duration_since(turn);
                            until.saw(ack.position);
                            latencies.record(ack.latency);
                            acks.push(ack);
                        }
                        Err(error) => {
                            errors += 1;
                            if errors == 1 {
                                eprintln!("{label}: {error:#}");
                            }
                        }
                    }
                }
                (client, latencies, acks, errors)
            }));
        }
        self.collect(tasks, started, name).await
    }

    async fn collect(
        &mut self,
        tasks: Vec<tokio::task::JoinHandle<ClientRun>>,
        started: Instant,
        name: &str,
    ) -> anyhow::Result<Load> {
        let mut latencies = Latencies::default();
        let mut acks = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (client, client_latencies, client_acks, client_errors) =
                task.await.context("a load client panicked")?;
            self.clients.push(client);
            latencies.merge(&client_latencies);
            acks.extend(client_acks);
            errors += client_errors;
        }
        let elapsed = started.elapsed();
        Ok(Load {
            result: RunResult::new(name, elapsed, latencies, errors),
            acks,
        })
    }
}

/// When a load run stops.
#[derive(Clone)]
enum Until {
    Deadline(Instant),
    /// Once an acknowledged command's position reaches `events`.
    Head {
        reached: Arc<AtomicI64>,
        events: i64,
    },
}

impl Until {
    fn after(duration: Duration) -> Self {
        Until::Deadline(Instant::now() + duration)
    }

    fn reached(&self) -> bool {
        match self {
            Until::Deadline(deadline) => Instant::now() >= *deadline,
            Until::Head { reached, events } => reached.load(Ordering::Relaxed) >= *events,
        }
    }

    fn saw(&self, position: i64) {
        if let Until::Head { reached, .. } = self {
            reached.fetch_max(position, Ordering::Relaxed);
        }
    }
}

/// Hands out turns at a fixed rate: each turn carries the instant it was due.
pub struct Pacer {
    turns: Mutex<tokio::sync::mpsc::Receiver<Instant>>,
}

impl Pacer {
    async fn take(&self) -> Option<Instant> {
        self.turns.lock().await.recv().await
    }
}

fn spawn_pacer(rate: f64, duration: Duration) -> Arc<Pacer> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1_000_000);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let total = (rate * duration.as_secs_f64()).ceil() as u64;
        for n in 0..total {
            let due = start + interval.mul_f64(n as f64);
            tokio::time::sleep_until(due).await;
            if sender.send(due.into_std()).await.is_err() {
                return;
            }
        }
    });
    Arc::new(Pacer {
        turns: Mutex::new(receiver),
    })
}

/// Samples the lowest checkpoint of the active read models every
/// millisecond until told to stop: (when the sample came back, checkpoint).
pub fn watch_checkpoints(
    database_url: &str,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<anyhow::Result<Samples>>,
) {
    let (stop, mut stopped) = watch::channel(false);
    let url = database_url.to_string();
    let task = tokio::spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .context("connecting the lag watcher")?;
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !*stopped.borrow_and_update() {
            tick.tick().await;
            let checkpoint: Option<i64> = sqlx::query_scalar(
                "SELECT min(checkpoint) FROM rm_projections WHERE state = 'active'",
            )
            .fetch_one(&mut conn)
            .await?;
            samples.push((Instant::now(), checkpoint.unwrap_or(0)));
        }
        Ok(samples)
    });
    (stop, task)
}

/// Per acknowledged command: from its acknowledgement to the first sample
/// showing every read model at or past its position.
pub fn lags(acks: &[Ack], samples: &[(Instant, i64)]) -> (Latencies, usize) {
    let mut latencies = Latencies::default();
    let mut unseen = 0;
    for ack in acks {
        // Checkpoints only grow, so the samples are sorted by checkpoint too.
        let index = samples.partition_point(|(_, checkpoint)| *checkpoint < ack.position);
        match samples.get(index) {
            Some((seen, _)) => latencies.record(seen.saturating_duration_since(ack.acked_at)),
            None => unseen += 1,
        }
    }
    (latencies, unseen)
}

/// Our side of the stream-length comparison: opportunities grown to
/// `plan.stream_len` events through the API, then updated as the plan says.
pub async fn streams(
    server: &Server,
    world: &Arc<World>,
    plan: StreamPlan,
) -> anyhow::Result<RunResult> {
    let target = &server.target;
    let account = world
        .account_ids
        .first()
        .context("no account registered")?
        .clone();
    let seeded = futures::future::try_join_all((0..plan.clients).map(|_| {
        let target = target.clone();
        let account = account.clone();
        async move {
            let mut streams = Vec::new();
            for n in 0..plan.streams_per_client() {
                let opened = send(
                    &target,
                    &Method::POST,
                    "/v1/opportunities",
                    &serde_json::json!({"account_id": account, "name": format!("Stream {n}"),
                        "amount": {"amount": "120000.00", "currency": "USD"},
                        "expected_close": "2027-06-30", "owner": "Anna Snelling"}),
                )
                .await?;
                let id = opened["id"].as_str().context("no id")?.to_string();
                for update in 0..plan.stream_len.saturating_sub(1) {
                    send(
                        &target,
                        &Method::PATCH,
                        &format!("/v1/opportunities/{id}"),
                        &plan::update_body(update),
                    )
                    .await?;
                }
                streams.push(id);
            }
            anyhow::Ok(streams)
        }
    }))
    .await?;
    // The clock starts on caught-up read models: seeding a long stream leaves the projections
    // a backlog that would otherwise compete with the measured commands.
    if server.folds() {
        let head = log_head(target).await?;
        wait_caught_up(target, head, Duration::from_secs(600)).await?;
    }
    server.analyze().await?;
    let started = Instant::now();
    let tasks: Vec<_> = seeded
        .into_iter()
        .map(|streams| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut errors = 0u64;
                let mut sent = 0;
                'streams: for id in &streams {
                    for k in 0..plan.per_stream() {
                        if sent == plan.commands_per_client {
                            break 'streams;
                        }
                        let update = plan.stream_len.saturating_sub(1) + k;
                        let began = Instant::now();
                        match send(
                            &target,
                            &Method::PATCH,
                            &format!("/v1/opportunities/{id}"),
                            &plan::update_body(update),
                        )
                        .await
                        {
                            Ok(_) => latencies.record(began.elapsed()),
                            Err(error) => {
                                errors += 1;
                                if errors == 1 {
                                    eprintln!("{error:#}");
                                }
                            }
                        }
                        sent += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Latencies::default();
    let mut errors = 0;
    for task in tasks {
        let (client, client_errors) = task.await.context("a stream client panicked")?;
        latencies.merge(&client);
        errors += client_errors;
    }
    Ok(RunResult::new(
        format!(
            "crm {} HTTP, {} events/stream",
            if server.folds() {
                "serve"
            } else {
                "command-service alone"
            },
            plan.stream_len
        ),
        started.elapsed(),
        latencies,
        errors,
    ))
}

/// GETs of `paths` (in turn) at `rate` per second for `duration`; latency
/// counts from each request's due time, so a stall is not hidden.
pub async fn paced_queries(
    target: &Target,
    paths: &[String],
    rate: f64,
    duration: Duration,
    name: &str,
) -> anyhow::Result<RunResult> {
    let in_flight = Arc::new(Semaphore::new(256));
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let total = (rate * duration.as_secs_f64()).ceil() as usize;
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .context("semaphore closed")?;
        let target = target.clone();
        let path = paths[n % paths.len()].clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            let outcome = target.get_unparsed(&path).await.map(|_| due.elapsed());
            drop(permit);
            let _ = sender.send(outcome);
        });
    }
    drop(sender);
    let mut latencies = Latencies::default();
    let mut errors = 0;
    while let Some(outcome) = receiver.recv().await {
        match outcome {
            Ok(latency) => latencies.record(latency),
            Err(error) => {
                errors += 1;
                if errors == 1 {
                    eprintln!("{error:#}");
                }
            }
        }
    }
    Ok(RunResult::new(name, started.elapsed(), latencies, errors))
}

/// The lowest checkpoint of the service's projections, from `/v1/projections`.
pub async fn projections_checkpoint(target: &Target) -> anyhow::Result<(i64, Vec<String>)> {
    let body = target.get("/v1/projections").await?;
    let projections = body["projections"].as_array().context("no projections")?;
    let mut names = Vec::new();
    let mut lowest = i64::MAX;
    for projection in projections {
        if projection["state"] == "active" {
            names.push(projection["name"].as_str().context("no name")?.to_string());
            lowest = lowest.min(projection["position"].as_i64().context("no position")?);
        }
    }
    anyhow::ensure!(!names.is_empty(), "no active projection");
    Ok((lowest, names))
}

/// The log's head position, as `/v1/projections` reports it.
pub async fn log_head(target: &Target) -> anyhow::Result<i64> {
    let body = target.get("/v1/projections").await?;
    body["projections"]
        .as_array()
        .and_then(|projections| projections.iter().filter_map(|p| p["head"].as_i64()).max())
        .context("no head in /v1/projections")
}

/// Waits until every active projection reached `position`.
pub async fn wait_caught_up(
    target: &Target,
    position: i64,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let (checkpoint, names) = projections_checkpoint(target).await?;
        if checkpoint >= position {
            return Ok(names);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "projections at {checkpoint}, not {position}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rebuilds each projection with `crm rebuild` while the service runs; the
/// wall time of each.
pub async fn rebuild(
    server: &Server,
    projections: &[String],
) -> anyhow::Result<Vec<(String, Duration)>> {
    let mut times = Vec::new();
    for name in projections {
        let started = Instant::now();
        server.crm(&["rebuild", name]).await?;
        times.push((name.clone(), started.elapsed()));
    }
    Ok(times)
}

/// Reads the whole embedded log as a rebuild does (`read_all`, a batch at a
/// time, every event decoded) and nothing else: the pace no rebuild can beat,
/// since each one reads every event. Returns the events read and the time.
pub async fn read_whole_log(log_file: &std::path::Path) -> anyhow::Result<(i64, Duration)> {
    const BATCH: i64 = 2000;
    let log = crm_eventlog::EventLog::open_sqlite(log_file).await?;
    let started = Instant::now();
    let (mut position, mut read) = (0, 0);
    loop {
        let events = log.read_all(position, BATCH).await?;
        read += events.len() as i64;
        match events.last() {
            Some(last) if events.len() as i64 == BATCH => position = last.position,
            _ => break,
        }
    }
    let elapsed = started.elapsed();
    log.close().await;
    Ok((read, elapsed))
}
