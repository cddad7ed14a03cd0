//! The replay worker: delivers captured requests from the spool once their
//! backend recovers, at least once, in capture order per route.
//!
//! A record leaves the queue only after the backend accepted it (2xx/3xx) or
//! it went to the dead-letter table. A route whose head record failed waits
//! (backoff from `replay.initial_delay` to `replay.max_delay`) and its later
//! records wait behind it, so per-route order holds; other routes go on:
//! each route is read and replayed on its own task.

mod deliver;
pub mod kafka_consumer;
pub mod kafka_lag;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use deliver::{deliver, deliver_by_worker, Delivery, X_BACKSTOP_REPLAY_ATTEMPT};

use crate::capture::record::CaptureRecord;
use crate::capture::spool::{now_ms, QueuedRecord, Spool, SpoolError};
use crate::pipeline::Proxy;
use crate::resilience::backoff::Backoff;

/// How many of a route's queued records one read takes (bodies included,
/// at most `spool::BATCH_BYTES` of them): replay ran about 15 % slower
/// with batches of 16 (`bench/capture.sh`).
const BATCH: usize = 128;
/// Reads per task: a task delivers at most 512 records, then its route is
/// read from its head again.
const BATCHES_PER_TASK: usize = 4;
/// The longest the worker sleeps when nothing wakes it.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often a standing-by worker tries to take over the spool's replay.
const LOCK_POLL: Duration = Duration::from_secs(1);
/// The least time between two looks at the queue that new captures cause:
/// while a backend is down they come by the thousand a second, and each
/// look reads the head of every route in backoff.
const WAKE_GAP: Duration = Duration::from_millis(100);

/// The spool's replay lock, held while this worker runs (released when
/// the file closes); `None` where the file system cannot lock.
struct ReplayLock {
    _file: Option<std::fs::File>,
}

/// Replay outcomes since start, for `/queue` and metrics.
#[derive(Default)]
pub struct ReplayCounters {
    delivered: AtomicU64,
    dead: AtomicU64,
    retried: AtomicU64,
}

impl ReplayCounters {
    pub fn add_delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_dead(&self) {
        self.dead.fetch_add(1, Ordering::Relaxed);
    }
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    pub fn dead(&self) -> u64 {
        self.dead.load(Ordering::Relaxed)
    }
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct SpoolReplayer {
    spool: Arc<Spool>,
    proxy: Arc<Proxy>,
    counters: Arc<ReplayCounters>,
    write_failures: Arc<Mutex<WriteFailures>>,
    /// Whether captures left waiting for Kafka are taken over once this
    /// worker holds the replay lock (`backstop replay` without `[kafka]`).
    takes_kafkas_captures: bool,
}

/// Spool writes failing (a full disk, a read-only file system): how many
/// route tasks in a row met one, and until when no record is delivered.
/// Each delivered record's delete could fail again, and the record would
/// go out again with the next read: without this pause, a route's first
/// 512 records were sent every second for as long as the fault lasted.
#[derive(Default)]
struct WriteFailures {
    in_a_row: u32,
    until: Option<Instant>,
}

/// Why a route task stopped early: the spool could not be read, or not
/// written (a record's delete, its next attempt's time, its dead letter).
enum Stopped {
    Read(SpoolError),
    Write(SpoolError),
}

/// The deletes of delivered records, committed while the next one goes.
type Deletes = JoinSet<Result<(), SpoolError>>;

/// What the worker knows of a route with queued records.
enum RouteTurn {
    /// Its task (this one) is replaying it.
    Running(tokio::task::Id),
    /// Idle; its head is looked at again from then on (or at the next
    /// capture).
    WaitUntil(Instant),
}

impl SpoolReplayer {
    pub fn new(spool: Arc<Spool>, proxy: Arc<Proxy>, counters: Arc<ReplayCounters>) -> Self {
        SpoolReplayer {
            spool,
            proxy,
            counters,
            write_failures: Arc::default(),
            takes_kafkas_captures: false,
        }
    }

    /// Replays, once it holds the replay lock, the captures a run with
    /// `[kafka]` left waiting for Kafka: taken before, they could be
    /// replayed here while the running process that holds the lock still
    /// forwards them to Kafka.
    pub fn taking_kafkas_captures(mut self) -> Self {
        self.takes_kafkas_captures = true;
        self
    }

    /// Waits until this process is the one that replays the spool (a
    /// `backstop replay` beside `backstop run` on the same data directory
    /// would otherwise deliver every record twice): a second worker stands
    /// by and takes over when the first stops. `None` at shutdown.
    async fn wait_for_replay_lock(&self, shutdown: &CancellationToken) -> Option<ReplayLock> {
        let mut told = false;
        loop {
            match self.spool.try_lock_replay() {
                Ok(Some(file)) => return Some(ReplayLock { _file: Some(file) }),
                Ok(None) if !told => {
                    tracing::info!("another process replays this spool; this worker stands by");
                    told = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot lock the spool for replay; replaying without the lock");
                    return Some(ReplayLock { _file: None });
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(LOCK_POLL) => {}
            }
        }
    }

    /// Replays every route on its own task, so a route with a deep backlog,
    /// a slow backend or a long backoff never holds up another: a route
    /// whose task ended waits the time its task returned, or until a new
    /// capture wakes the worker; then its head is read again.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(_replaying) = self.wait_for_replay_lock(&shutdown).await else {
            return;
        };
        if self.takes_kafkas_captures {
            hand_kafkas_captures_to_replay(&self.spool).await;
        }
        tracing::info!("replay worker started");
        let mut routes: HashMap<String, RouteTurn> = HashMap::new();
        let mut tasks: JoinSet<Duration> = JoinSet::new();
        let mut woken_at: Option<Instant> = None;
        loop {
            let wait = match self.start_due(&mut routes, &mut tasks, &shutdown).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::error!(error = %e, "reading the replay queue failed");
                    IDLE_POLL
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.spool.appended.notified() => {
                    // Captures meanwhile are one wake-up (`Notify` keeps
                    // one).
                    if let Some(gap) = woken_at.and_then(|at| WAKE_GAP.checked_sub(at.elapsed())) {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(gap) => {}
                        }
                    }
                    woken_at = Some(Instant::now());
                    // A new or requeued record may be due at once, also on
                    // a route in backoff (a requeued one, or one whose
                    // request came before the route's head did, has the
                    // smaller id: it goes first once its route is read
                    // from the head).
                    for turn in routes.values_mut() {
                        if let RouteTurn::WaitUntil(at) = turn {
                            *at = Instant::now();
                        }
                    }
                }
                Some(ended) = tasks.join_next_with_id() => {
                    let (task, wait) = match ended {
                        Ok((task, wait)) => (task, wait.min(IDLE_POLL)),
                        // A task that panicked: its route is tried again
                        // after the idle poll.
                        Err(e) => (e.id(), IDLE_POLL),
                    };
                    let at = Instant::now() + wait;
                    for turn in routes.values_mut() {
                        if matches!(turn, RouteTurn::Running(id) if *id == task) {
                            *turn = RouteTurn::WaitUntil(at);
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Each task stops after the record it is delivering.
        while tasks.join_next().await.is_some() {}
        tracing::info!("replay worker stopped");
    }

    /// Starts a task for each route with queued records that is neither
    /// replaying nor waiting; returns how long until the next idle route is
    /// due (at most the idle poll).
    async fn start_due(
        &self,
        routes: &mut HashMap<String, RouteTurn>,
        tasks: &mut JoinSet<Duration>,
        shutdown: &CancellationToken,
    ) -> Result<Duration, SpoolError> {
        let queued = self.read(Spool::routes_to_replay).await?;
        // A route whose records all left the queue is forgotten, unless its
        // task still runs (it ends by itself).
        routes.retain(|name, turn| matches!(turn, RouteTurn::Running(_)) || queued.contains(name));
        let now = Instant::now();
        let mut next = now + IDLE_POLL;
        for name in queued {
            let turn = routes
                .entry(name.clone())
                .or_insert(RouteTurn::WaitUntil(now));
            match turn {
                RouteTurn::WaitUntil(at) if *at <= now => {
                    let (worker, shutdown) = (self.clone(), shutdown.clone());
                    let task =
                        tasks.spawn(async move { worker.replay_route(&name, &shutdown).await });
                    *turn = RouteTurn::Running(task.id());
                }
                RouteTurn::WaitUntil(at) => next = next.min(*at),
                RouteTurn::Running(_) => {}
            }
        }
        Ok(next.saturating_duration_since(now))
    }

    /// Replays one route's records in order until one must wait (or the
    /// worker stops, or 512 went); returns how long until that one is due
    /// (zero when it need not wait).
    async fn replay_route(&self, route: &str, shutdown: &CancellationToken) -> Duration {
        // Deletes of delivered records are committed in the background (the
        // writer batches them) while the next record is delivered. Later
        // batches are read after the last record read, and the route is read
        // from its head again only once the task has waited for all of its
        // deletes, so a record is never read back after its delivery.
        if let Some(wait) = self.paused_for_writes() {
            return wait;
        }
        let mut deletes = JoinSet::new();
        let mut failed = false;
        let wait = match self.replay_due(route, shutdown, &mut deletes).await {
            Ok(wait) => wait,
            Err(Stopped::Read(e)) => {
                tracing::error!(route, error = %e, "the replay queue could not be read");
                IDLE_POLL
            }
            Err(Stopped::Write(e)) => {
                tracing::error!(route, error = %e, "the replay queue could not be updated");
                failed = true;
                IDLE_POLL
            }
        };
        while let Some(result) = deletes.join_next().await {
            if let Ok(Err(e)) = result {
                // The record stays queued and will be delivered again, with
                // the same Idempotency-Key: at least once, never lost.
                tracing::error!(error = %e, "removing a delivered record failed");
                failed = true;
            }
        }
        if failed {
            self.pause_for_writes()
        } else {
            wait
        }
    }

    /// How long deliveries still pause for failed spool writes, if they do.
    fn paused_for_writes(&self) -> Option<Duration> {
        let failures = self
            .write_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let left = failures.until?.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// After a route task met a failed spool write: deliveries pause, twice
    /// as long each time in a row (1 s up to `replay.max_delay`; a delete
    /// that works again ends the row); returns the pause. Route tasks that
    /// fail during one pause (every route meets the same full disk) count
    /// once.
    fn pause_for_writes(&self) -> Duration {
        let mut failures = self
            .write_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(until) = failures.until.filter(|&until| until > now) {
            return until - now;
        }
        failures.in_a_row = failures.in_a_row.saturating_add(1);
        let max = self
            .proxy
            .active
            .load()
            .config
            .replay
            .max_delay
            .max(IDLE_POLL);
        let pause = IDLE_POLL
            .saturating_mul(1 << failures.in_a_row.min(16).saturating_sub(1))
            .min(max);
        failures.until = Some(now + pause);
        tracing::warn!(
            ?pause,
            in_a_row = failures.in_a_row,
            "spool writes fail: replay pauses"
        );
        pause
    }

    /// [`Self::replay_route`]'s deliveries, a batch at a time.
    async fn replay_due(
        &self,
        route: &str,
        shutdown: &CancellationToken,
        deletes: &mut Deletes,
    ) -> Result<Duration, Stopped> {
        // The head alone first, without its body: a route in backoff costs
        // one small read each time the worker looks.
        let name = route.to_string();
        let head = self
            .read(move |spool| spool.replay_head_due_at(&name))
            .await
            .map_err(Stopped::Read)?;
        let Some(due_at) = head else {
            return Ok(Duration::ZERO);
        };
        if let Some(wait) = self.must_wait(route, due_at) {
            return Ok(wait);
        }
        let mut after = String::new();
        for _ in 0..BATCHES_PER_TASK {
            let (name, from) = (route.to_string(), after.clone());
            let batch = self
                .read(move |spool| spool.queued_for_replay(&name, &from, BATCH))
                .await
                .map_err(Stopped::Read)?;
            let full = batch.len() == BATCH;
            for queued in batch {
                if shutdown.is_cancelled() {
                    return Ok(Duration::ZERO);
                }
                if let Some(wait) = self.must_wait(route, queued.next_at_ms) {
                    return Ok(wait);
                }
                // A delete that failed stops the route: every later record's
                // would fail too, and each record would go out again.
                while let Some(done) = deletes.try_join_next() {
                    if let Ok(Err(e)) = done {
                        return Err(Stopped::Write(e));
                    }
                }
                let replayed = self.replay_one(&queued, deletes).await;
                if let Some(wait) = replayed.map_err(Stopped::Write)? {
                    return Ok(wait);
                }
                after = queued.id;
            }
            if !full {
                break;
            }
        }
        // Emptied, or read from the head again right away (so a record
        // that came in behind the cursor, requeued or late, is not left
        // waiting behind a whole backlog).
        Ok(Duration::ZERO)
    }

    /// How long the route's next record, due at `due_at_ms`, must wait: until
    /// then, or while the route's circuit is open (its backend is known to
    /// be down: wait for half-open rather than spend replay attempts).
    ///
    /// `due_at_ms` is wall-clock time (it outlives the process): a record
    /// due further out than the longest backoff was scheduled before the
    /// clock stepped back, and is due now rather than hours later, its
    /// route stalled behind it.
    fn must_wait(&self, route: &str, due_at_ms: i64) -> Option<Duration> {
        let now = now_ms();
        if due_at_ms > now {
            let wait = Duration::from_millis((due_at_ms - now) as u64);
            let longest = Backoff::longest(self.proxy.active.load().config.replay.max_delay);
            if wait <= longest {
                return Some(wait);
            }
        }
        self.proxy.resilience.open_for(route)
    }

    /// A read of the spool, off the runtime's threads.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || read(&spool))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    fn count(&self, route: &str, outcome: &str) {
        self.proxy.metrics.count_replay(route, outcome);
    }

    /// One record: `Ok(None)` when it left the queue, `Ok(Some(wait))` when
    /// it must be tried again later.
    async fn replay_one(
        &self,
        queued: &QueuedRecord,
        deletes: &mut Deletes,
    ) -> Result<Option<Duration>, SpoolError> {
        let active = self.proxy.active.load_full();
        let replay = &active.config.replay;
        let attempt = queued.attempts + 1;
        let record = match CaptureRecord::from_json(&queued.record) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(id = %queued.id, error = %e, "undecodable record sent to the dead-letter queue");
                self.spool
                    .dead_letter(&queued.id, queued.attempts, &e.to_string())
                    .await?;
                self.counters.dead.fetch_add(1, Ordering::Relaxed);
                self.count(&queued.route, "dead_letter");
                return Ok(None);
            }
        };
        let outcome = deliver_by_worker(&self.proxy, &active, &record, attempt).await;
        let sent = !matches!(outcome, Delivery::Busy(_));
        match outcome {
            Delivery::Delivered(status) => {
                // Counted once the delete is committed, so `/queue` never
                // shows a record as replayed and still queued.
                let (spool, id) = (self.spool.clone(), queued.id.clone());
                let (counters, proxy) = (self.counters.clone(), self.proxy.clone());
                let (route, failures) = (record.route.clone(), self.write_failures.clone());
                deletes.spawn(async move {
                    spool.delete(&id).await?;
                    // Writes work (again): the next failure pauses 1 s.
                    failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .in_a_row = 0;
                    counters.add_delivered();
                    proxy.metrics.count_replay(&route, "delivered");
                    Ok(())
                });
                tracing::info!(id = %queued.id, route = %record.route, attempt, status, "replayed");
                Ok(None)
            }
            Delivery::Dead(reason) => {
                self.spool.dead_letter(&queued.id, attempt, &reason).await?;
                self.counters.dead.fetch_add(1, Ordering::Relaxed);
                self.count(&record.route, "dead_letter");
                tracing::warn!(id = %queued.id, route = %record.route, %reason, "replay gave up: dead letter");
                Ok(None)
            }
            Delivery::Retry(reason) if attempt >= replay.max_attempts => {
                let reason = format!("{reason} (after {attempt} attempts)");
                self.spool.dead_letter(&queued.id, attempt, &reason).await?;
                self.counters.dead.fetch_add(1, Ordering::Relaxed);
                self.count(&record.route, "dead_letter");
                tracing::warn!(id = %queued.id, route = %record.route, %reason, "replay gave up: dead letter");
                Ok(None)
            }
            Delivery::Retry(reason) | Delivery::Busy(reason) => {
                let backoff = Backoff {
                    initial: replay.initial_delay,
                    max: replay.max_delay,
                    factor: 2.0,
                };
                let wait = backoff.delay(attempt);
                let next_at = now_ms() + wait.as_millis() as i64;
                // A replay that was not sent (`Busy`) spends no attempt,
                // and is no retry.
                let spent = if sent { attempt } else { queued.attempts };
                self.spool
                    .retry_later(&queued.id, spent, next_at, &reason)
                    .await?;
                if sent {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                }
                self.count(&record.route, if sent { "retry" } else { "busy" });
                tracing::debug!(id = %queued.id, route = %record.route, attempt, %reason, ?wait, "replay failed; backing off");
                Ok(Some(wait))
            }
        }
    }
}

/// For a process without `[kafka]` that replays nothing: hands the records
/// a run with `[kafka]` left waiting for it to the spool's replay queue
/// (where `backstop replay` and `queue replay` find them), unless a process
/// that replays this spool holds its lock: that one takes them itself, or,
/// with `[kafka]`, still forwards them.
pub async fn hand_kafkas_captures_over_if_free(spool: &Spool) {
    match spool.try_lock_replay() {
        Ok(Some(lock)) => {
            hand_kafkas_captures_to_replay(spool).await;
            drop(lock);
        }
        Ok(None) => {
            tracing::info!(
                "another process replays this spool: captures spooled for Kafka are left to it"
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the replay lock: captures spooled for Kafka stay where they are")
        }
    }
}

/// Records a run with `[kafka]` left waiting for it: without Kafka nothing
/// would forward them, so the spool replays them itself.
async fn hand_kafkas_captures_to_replay(spool: &Spool) {
    match spool.replay_instead_of_kafka(None).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            records = n,
            "captures spooled for Kafka are replayed from the spool (no [kafka] configured)"
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot hand captures spooled for Kafka to the spool's replay")
        }
    }
}
