//! The command line: `run`, `check`, `replay`, `queue ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::capture::kafka_sink::KafkaSink;
use crate::capture::record::CaptureRecord;
use crate::capture::spool::{DeadLetterSummary, Destination, QueuedRecord, Spool};
use crate::pipeline::Proxy;
use crate::replay::kafka_consumer::KafkaReplayer;
use crate::replay::{deliver, Delivery, ReplayCounters, SpoolReplayer};
use crate::runtime;

#[derive(Parser, Debug)]
#[command(
    name = "backstop",
    version,
    about = "A resilient HTTP reverse proxy that never loses a request"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "backstop.toml",
        env = "BACKSTOP_CONFIG"
    )]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy, the admin listener and (by default) the replay worker.
    Run(ConfigArg),
    /// Validate the configuration; every error names its key.
    Check(ConfigArg),
    /// Run a replay worker alone.
    Replay(ConfigArg),
    /// Inspect and act on captured requests and dead letters.
    Queue {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: QueueAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum QueueAction {
    /// List queued records (or dead letters).
    List {
        #[arg(long)]
        dead_letters: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one record, queued or dead.
    Show { id: String },
    /// Deliver one queued or dead record now (or, with --all, every queued
    /// record, in capture order per route).
    Replay {
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Move dead letters back to the queue.
    Requeue {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete every dead letter.
    Purge {
        #[arg(long, required = true)]
        dead_letters: bool,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check(arg) => check(&arg.config),
        Command::Run(arg) => run(&arg.config, Mode::Proxy),
        Command::Replay(arg) => run(&arg.config, Mode::ReplayOnly),
        Command::Queue {
            config,
            json,
            action,
        } => queue(&config.config, json, action),
    }
}

fn check(path: &Path) -> ExitCode {
    match runtime::load_checked(path, true) {
        Ok((active, _)) => {
            for (route, warning) in crate::routing::warnings(&active.config) {
                eprintln!("warning: route {route}: {warning}");
            }
            println!(
                "{}: OK ({} routes)",
                path.display(),
                active.config.routes.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.errors.len());
            ExitCode::from(2)
        }
    }
}

enum Mode {
    Proxy,
    ReplayOnly,
}

fn run(path: &Path, mode: Mode) -> ExitCode {
    // Read before the file is: a change made while the process starts is
    // then picked up by the config watcher's first look.
    let loaded = runtime::stamp(path);
    let (active, tls) = match runtime::load_checked(path, matches!(mode, Mode::Proxy)) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s); not starting", errors.errors.len());
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&active.config.log);
    crate::routing::log_warnings(&active.config);
    let mut builder = match active.config.server.workers {
        // One worker: Tokio's single-threaded scheduler, which runs every
        // task on this thread without the work-stealing machinery (atomics,
        // cross-thread wake-ups) that one worker never needs.
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match mode {
            Mode::Proxy => runtime::run(path.to_path_buf(), loaded, active, tls).await,
            Mode::ReplayOnly => replay_only(path.to_path_buf(), loaded, active).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("backstop: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `backstop replay`: the replay worker alone. SIGTERM and SIGINT stop it
/// as they stop `backstop run` (the spool worker finishes each route's
/// record in delivery; a Kafka consumer leaves its group, its uncommitted
/// records going to another member); SIGHUP and a change of the file
/// reload the configuration, so replays follow the routes' new settings.
async fn replay_only(
    path: PathBuf,
    loaded: Option<runtime::FileStamp>,
    active: crate::pipeline::Active,
) -> Result<(), String> {
    // SIGHUP's handler first: without one, a SIGHUP would end the process
    // during start-up (the spool's lock can take seconds). SIGTERM and
    // SIGINT end a start-up at once; their handlers come before the worker
    // starts (without them, a stop would end it mid-delivery).
    let hangup = signal(SignalKind::hangup()).ok();
    let spool = Spool::open(&active.config.server.data_dir).map_err(|e| e.to_string())?;
    let metrics = Arc::new(crate::stats::metrics::Metrics::new());
    let proxy = Arc::new(Proxy {
        active: ArcSwap::from_pointee(active),
        capturer: None,
        resilience: Arc::new(crate::resilience::Registry::new(metrics.clone())),
        stats: crate::stats::Stats::disabled(),
        caches: crate::cache::Caches::new(metrics.clone()),
        metrics,
        // A standalone replay worker serves no client requests.
        otel: crate::otel::Tracing::disabled(),
        buffers: Arc::default(),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut stop_signals = runtime::StopSignals::install();
    tokio::spawn(runtime::watch_config(
        path,
        loaded,
        hangup,
        proxy.clone(),
        None,
        shutdown.clone(),
    ));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop_signals.recv().await;
        tracing::info!("stopping: finishing the records in delivery (a second SIGTERM or SIGINT stops at once)");
        stop.cancel();
        // A record cut mid-delivery is delivered again later (the backend
        // de-duplicates on its idempotency key): nothing is lost.
        stop_signals.recv_second().await;
        tracing::warn!("second stop signal; stopping now");
        std::process::exit(1);
    });
    let counters = Arc::new(ReplayCounters::default());
    let config = proxy.active.load().config.clone();
    match &config.kafka {
        // With Kafka, a standalone worker is one more member of the group.
        // It also replays its data directory's spool when no other process
        // does (it holds the spool's replay lock): records requeued there,
        // and captures Kafka refused for their size, which an instance with
        // `replay.enabled = false` would otherwise keep for ever.
        Some(kafka) => {
            let sink = Arc::new(KafkaSink::new(kafka)?);
            let spool_worker = SpoolReplayer::new(spool.clone(), proxy.clone(), counters.clone());
            let spool_task = tokio::spawn(spool_worker.run(shutdown.clone()));
            let worker = KafkaReplayer {
                sink,
                spool,
                proxy,
                counters,
            };
            let result = worker
                .run(
                    kafka.clone(),
                    config.replay.group_id.clone(),
                    shutdown.clone(),
                )
                .await;
            shutdown.cancel();
            let _ = spool_task.await;
            result
        }
        None => {
            // What a run with `[kafka]` left waiting for it is replayed
            // from the spool, as `backstop run` without Kafka does.
            let worker = SpoolReplayer::new(spool, proxy, counters).taking_kafkas_captures();
            worker.run(shutdown).await;
            Ok(())
        }
    }
}

fn queue(path: &Path, as_json: bool, action: QueueAction) -> ExitCode {
    let active = match runtime::load_active(path) {
        Ok(a) => a,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(queue_action(active, as_json, action)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backstop queue: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn queue_action(
    active: crate::pipeline::Active,
    as_json: bool,
    action: QueueAction,
) -> Result<(), String> {
    let data_dir = runtime::data_dir(&active.config);
    // Never a new, empty spool: a `data_dir` that names none (relative, it
    // is read from the working directory) would list nothing and act on
    // nothing, with every record waiting in the real one.
    let file = data_dir.join("spool.sqlite3");
    if !file.is_file() {
        let shown = std::path::absolute(&file).unwrap_or(file);
        return Err(format!(
            "no spool at {} (data_dir; a relative one is read from the working directory):              run from where the proxy runs, or set an absolute data_dir",
            shown.display()
        ));
    }
    let spool = Spool::open(data_dir).map_err(|e| e.to_string())?;
    let err = |e: crate::capture::spool::SpoolError| e.to_string();
    match action {
        QueueAction::List {
            dead_letters: false,
            limit,
        } => {
            let rows = spool.list(limit).map_err(err)?;
            print_queued(&rows, as_json);
        }
        QueueAction::List {
            dead_letters: true,
            limit,
        } => {
            let rows = spool.dead_letters(limit).map_err(err)?;
            print_dead(&rows, as_json);
        }
        QueueAction::Show { id } => {
            let (bytes, status) = match (
                spool.get(&id).map_err(err)?,
                spool.get_dead(&id).map_err(err)?,
            ) {
                (Some(q), _) => (
                    q.record,
                    json!({"state": "queued", "attempts": q.attempts, "last_error": q.last_error}),
                ),
                (None, Some(d)) => (
                    d.record,
                    json!({"state": "dead", "attempts": d.attempts, "error": d.error}),
                ),
                (None, None) => return Err(format!("no record {id}")),
            };
            let record: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
            let shown = json!({"status": status, "record": record});
            println!(
                "{}",
                serde_json::to_string_pretty(&shown).unwrap_or_default()
            );
        }
        QueueAction::Replay { id: Some(id), .. } => {
            // A dead letter is no worker's: it needs no turn. A record
            // waiting for Kafka is the forwarder's, which may hold it in
            // its batch already.
            let _replaying = match spool.destination_of(&id).map_err(err)? {
                Some(Destination::Kafka) => {
                    return Err(format!(
                        "{id} is waiting for Kafka: the forwarder sends it there, and a replay worker delivers it from the topic"
                    ));
                }
                Some(Destination::Replay) => Some(replay_turn(&spool)?),
                None => None,
            };
            let status = replay_now(&spool, &active, &replay_caches(), &id).await?;
            if as_json {
                println!("{}", json!({"id": id, "delivered": true, "status": status}));
            } else {
                println!("{id}: delivered ({status})");
            }
        }
        QueueAction::Replay { id: None, .. } => {
            let _replaying = replay_turn(&spool)?;
            replay_all(&spool, &active, &replay_caches(), as_json).await?
        }
        QueueAction::Requeue { id, all } => {
            let moved = match (id, all) {
                (Some(id), _) => spool.requeue(Some(&id)).await.map_err(err)?,
                (None, true) => spool.requeue(None).await.map_err(err)?,
                (None, false) => return Err("give a dead letter id or --all".into()),
            };
            if as_json {
                println!("{}", json!({ "requeued": moved }));
            } else {
                println!("requeued {moved} record(s)");
            }
        }
        QueueAction::Purge { .. } => {
            let purged = spool.purge_dead_letters().await.map_err(err)?;
            if as_json {
                println!("{}", json!({ "purged": purged }));
            } else {
                println!("purged {purged} dead letter(s)");
            }
        }
    }
    Ok(())
}

/// The caches a write replayed from the command line makes stale: those
/// in Redis (a running instance's memory store is out of this process's
/// reach, its entries live out their ttl).
fn replay_caches() -> crate::cache::Caches {
    crate::cache::Caches::new(Arc::new(crate::stats::metrics::Metrics::new()))
}

/// The spool's replay lock, for a replay of queued records from here:
/// beside a worker, a record it holds in its batch (or is delivering)
/// would go twice.
fn replay_turn(spool: &Spool) -> Result<std::fs::File, String> {
    match spool.try_lock_replay() {
        Ok(Some(lock)) => Ok(lock),
        Ok(None) => Err(
            "a replay worker is running on this data_dir (`backstop run` with \
             replay enabled, or `backstop replay`) and delivers the queue itself; stop it to \
             replay queued records from here (dead letters can be replayed meanwhile)"
                .into(),
        ),
        Err(e) => Err(format!("cannot open the replay lock: {e}")),
    }
}

/// Delivers one queued or dead record now; returns the backend's status.
async fn replay_now(
    spool: &Spool,
    active: &crate::pipeline::Active,
    caches: &crate::cache::Caches,
    id: &str,
) -> Result<u16, String> {
    let err = |e: crate::capture::spool::SpoolError| e.to_string();
    let (bytes, dead) = match (
        spool.get(id).map_err(err)?,
        spool.get_dead(id).map_err(err)?,
    ) {
        (Some(q), _) => (q.record, false),
        (None, Some(d)) => (d.record, true),
        (None, None) => return Err(format!("no record {id}")),
    };
    let record = CaptureRecord::from_json(&bytes).map_err(|e| format!("{id}: {e}"))?;
    let route = active
        .routes
        .get(&record.route)
        .ok_or_else(|| format!("{id}: route {:?} is not configured", record.route))?;
    // By hand: the operator's call, whatever this process's (fresh)
    // breaker would say.
    match deliver(caches, &active.config, route, &record, 1, None).await {
        Delivery::Delivered(status) => {
            if dead {
                // A dead letter delivered by hand leaves the dead-letter table.
                spool.delete_dead_letter(id).await.map_err(err)?;
            } else {
                spool.delete(id).await.map_err(err)?;
            }
            Ok(status)
        }
        Delivery::Retry(reason) | Delivery::Dead(reason) | Delivery::Busy(reason) => {
            Err(format!("{id}: not delivered: {reason}"))
        }
    }
}

/// Delivers every queued record now, oldest first; after a failure the rest
/// of that route waits (per-route order), other routes go on.
async fn replay_all(
    spool: &Spool,
    active: &crate::pipeline::Active,
    caches: &crate::cache::Caches,
    as_json: bool,
) -> Result<(), String> {
    // Records waiting for Kafka are the forwarder's: delivered from here
    // too, they would reach the backend twice.
    // Ids only: each record is read when it is delivered.
    let rows = spool
        .queued_ids(Destination::Replay)
        .map_err(|e| e.to_string())?;
    let bar = if as_json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(rows.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} delivered {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut blocked = std::collections::HashSet::new();
    let (mut delivered, mut failed) = (0u64, Vec::new());
    for (id, route) in rows {
        if blocked.contains(&route) {
            bar.inc(1);
            continue;
        }
        match replay_now(spool, active, caches, &id).await {
            Ok(_) => delivered += 1,
            Err(e) => {
                blocked.insert(route);
                failed.push(e);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if as_json {
        println!("{}", json!({"delivered": delivered, "failed": failed}));
    } else {
        println!("delivered {delivered} record(s)");
        for e in &failed {
            println!("  {e}");
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} route(s) could not be delivered", failed.len()))
    }
}

fn print_queued(rows: &[QueuedRecord], as_json: bool) {
    if as_json {
        let list: Vec<_> = rows
            .iter()
            .map(|r| json!({"id": r.id, "route": r.route, "attempts": r.attempts, "last_error": r.last_error, "summary": summary(&r.record)}))
            .collect();
        println!("{}", serde_json::Value::from(list));
        return;
    }
    println!(
        "{:<38} {:<16} {:>8}  {:<40} LAST ERROR",
        "ID", "ROUTE", "ATTEMPTS", "REQUEST"
    );
    for r in rows {
        println!(
            "{:<38} {:<16} {:>8}  {:<40} {}",
            r.id,
            r.route,
            r.attempts,
            summary(&r.record),
            r.last_error.as_deref().unwrap_or("-")
        );
    }
    println!("{} record(s)", rows.len());
}

fn print_dead(rows: &[DeadLetterSummary], as_json: bool) {
    let summary = |r: &DeadLetterSummary| match (&r.method, &r.path) {
        (Some(method), Some(path)) => format!("{method} {path}"),
        _ => "(unreadable record)".to_string(),
    };
    if as_json {
        let list: Vec<_> = rows
            .iter()
            .map(|r| json!({"id": r.id, "route": r.route, "attempts": r.attempts, "error": r.error, "summary": summary(r)}))
            .collect();
        println!("{}", serde_json::Value::from(list));
        return;
    }
    println!(
        "{:<38} {:<16} {:>8}  {:<40} ERROR",
        "ID", "ROUTE", "ATTEMPTS", "REQUEST"
    );
    for r in rows {
        println!(
            "{:<38} {:<16} {:>8}  {:<40} {}",
            r.id,
            r.route,
            r.attempts,
            summary(r),
            r.error
        );
    }
    println!("{} dead letter(s)", rows.len());
}

/// "POST /api/users" for a record, or a note that it is not readable.
fn summary(bytes: &[u8]) -> String {
    match CaptureRecord::from_json(bytes) {
        Ok(r) => format!("{} {}", r.request.method, r.request.path),
        Err(_) => "(unreadable record)".to_string(),
    }
}
