//! The Kafka replay worker: a member of the consumer group `replay.group_id`
//! on the capture topic, so several workers share the partitions.
//!
//! At least once: an offset is committed only after the backend accepted the
//! record or it went to the dead-letter topic, and every record before it
//! too. The key is the route, and routes share partitions, so each
//! partition's records wait in lanes, one per route: a route's records go
//! one at a time, in order, and a route whose backend is down (its head in
//! backoff, or waiting for its circuit) does not hold up another route's
//! records on the same partition. The committed offset is the partition's
//! lowest record not finished, so after a restart or a rebalance the
//! records finished above it are delivered again (each carries its
//! `Idempotency-Key`). Consumed records wait in a small per-partition
//! buffer, so a record in backoff does not block the worker: it keeps
//! polling (the group does not drop it) and pauses a partition only while
//! that partition's buffer is full. Attempt counts live in memory: after a
//! restart or a rebalance a record starts counting again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{deliver_by_worker, Delivery, ReplayCounters};
use crate::capture::kafka_sink::{KafkaSink, Outbound};
use crate::capture::record::CaptureRecord;
use crate::capture::spool::Spool;
use crate::config::KafkaConfig;
use crate::pipeline::Proxy;
use crate::resilience::backoff::Backoff;

type Partition = (String, i32);

/// Records buffered per partition before it is paused, and their bytes
/// (records may be up to Kafka's message size each: 512 of 1 MB would be
/// half a gigabyte a partition).
const BUFFER: usize = 512;
const BUFFER_BYTES: usize = 32 << 20;
/// The bytes all partitions' buffers may hold together: a worker given
/// many partitions gives each a share (at least [`MIN_BUFFER_BYTES`], room
/// for a record of Kafka's default size limit), not 32 MiB each, which
/// over 48 partitions would be 1.5 GiB. Each partition keeps a buffer of
/// its own, so that a route in backoff on one holds up no other.
const WORKER_BUFFER_BYTES: usize = 128 << 20;
const MIN_BUFFER_BYTES: usize = 2 << 20;

/// The bytes each partition may buffer when `partitions` have buffers.
fn buffer_bytes(partitions: usize) -> usize {
    (WORKER_BUFFER_BYTES / partitions.max(1)).clamp(MIN_BUFFER_BYTES, BUFFER_BYTES)
}
/// Consume errors (broker down) are logged at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a delivery task reports back to the polling loop.
struct Done {
    partition: Partition,
    /// The lane (route) of the record.
    route: String,
    /// The partition queue's generation when the task started: a report
    /// for a queue since revoked (and perhaps assigned again, as a new
    /// queue) is ignored, so it can neither commit nor free the new queue's
    /// head.
    generation: u64,
    verdict: Verdict,
}

enum Verdict {
    /// Delivered or dead-lettered: commit and move on.
    Finished,
    /// Try again after this long.
    Later(Duration),
    /// Not sent (the target had no free turn): try again after this long,
    /// the attempt not spent.
    Unsent(Duration),
    /// Given up with this reason after this many attempts, but the
    /// dead-letter topic could not be written: that write is tried again
    /// later, not the delivery (the backend had the request).
    DeadLetterUnwritten { reason: String, attempts: u32 },
}

/// How long a dead letter that could not be written waits for another try.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// One partition's buffered records, in lanes by route.
struct PartitionQueue {
    /// Which queue of the partition this is: one per assignment.
    generation: u64,
    /// A lane per route with records waiting (an emptied lane is removed).
    lanes: HashMap<String, Lane>,
    /// The offsets buffered and not finished, each with how many records
    /// hold it (two, if librdkafka reads a stretch again after an offset
    /// reset): the lowest is where the partition's committed offset stands.
    unfinished: BTreeMap<i64, u32>,
    /// Records buffered and not finished (the buffer's fill), and their
    /// payloads' bytes.
    buffered: usize,
    buffered_bytes: usize,
    /// The offset after the last record received.
    received_to: i64,
    /// The offset last committed.
    committed: i64,
    paused: bool,
}

/// One route's records of a partition; the head is the one worked on.
#[derive(Default)]
struct Lane {
    jobs: VecDeque<Job>,
    /// The head's delivery, while it runs.
    in_flight: Option<JoinHandle<()>>,
    due: Option<Instant>,
}

impl PartitionQueue {
    fn new(generation: u64) -> PartitionQueue {
        PartitionQueue {
            generation,
            lanes: HashMap::new(),
            unfinished: BTreeMap::new(),
            buffered: 0,
            buffered_bytes: 0,
            received_to: 0,
            committed: 0,
            paused: false,
        }
    }

    fn push(&mut self, job: Job) {
        *self.unfinished.entry(job.offset).or_default() += 1;
        self.buffered += 1;
        self.buffered_bytes += job.payload.len();
        self.received_to = self.received_to.max(job.offset + 1);
        self.lanes
            .entry(job.route.clone())
            .or_default()
            .jobs
            .push_back(job);
    }

    /// Takes a lane's finished head away; the offset to commit, if the
    /// finished record was the lowest unfinished one.
    fn finish(&mut self, route: &str) -> Option<i64> {
        let lane = self.lanes.get_mut(route)?;
        let job = lane.jobs.pop_front()?;
        if lane.jobs.is_empty() && lane.in_flight.is_none() {
            self.lanes.remove(route);
        }
        self.buffered -= 1;
        self.buffered_bytes -= job.payload.len();
        if let Some(holders) = self.unfinished.get_mut(&job.offset) {
            *holders -= 1;
            if *holders == 0 {
                self.unfinished.remove(&job.offset);
            }
        }
        let commit_to = self
            .unfinished
            .first_key_value()
            .map_or(self.received_to, |(&offset, _)| offset);
        (commit_to > self.committed).then(|| {
            self.committed = commit_to;
            commit_to
        })
    }

    /// Whether its buffer (of `bytes`, see [`buffer_bytes`]) is full: the
    /// partition is paused.
    fn full(&self, bytes: usize) -> bool {
        self.buffered >= BUFFER || self.buffered_bytes >= bytes
    }

    /// Whether its buffer has drained to half: a paused partition resumes.
    fn half_empty(&self, bytes: usize) -> bool {
        self.buffered < BUFFER / 2 && self.buffered_bytes < bytes / 2
    }

    /// Whether a delivery of its records is under way (one that panicked
    /// is not: it reports nothing).
    fn delivering(&self) -> bool {
        let running = |lane: &Lane| lane.in_flight.as_ref().is_some_and(|t| !t.is_finished());
        self.lanes.values().any(running)
    }

    fn in_flight(self) -> impl Iterator<Item = JoinHandle<()>> {
        self.lanes.into_values().filter_map(|lane| lane.in_flight)
    }
}

pub struct KafkaReplayer {
    pub proxy: Arc<Proxy>,
    pub sink: Arc<KafkaSink>,
    /// Keeps the dead letters the dead-letter topic refuses.
    pub spool: Arc<Spool>,
    pub counters: Arc<ReplayCounters>,
}

/// Tells the polling loop which partitions a rebalance took away, so their
/// buffered records are dropped (the new owner consumes them) instead of
/// being delivered twice.
struct RebalanceContext {
    revoked: mpsc::UnboundedSender<Vec<Partition>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // A partition paused for a full buffer stays paused through a
            // rebalance (librdkafka keeps the application's pause), and
            // its buffer is dropped below: given back to this worker it
            // would never be fetched again.
            if let Err(e) = consumer.resume(list) {
                tracing::debug!(error = %e, "resuming revoked partitions failed");
            }
            let partitions = list
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            let _ = self.revoked.send(partitions);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "Kafka partitions assigned");
        }
    }
}

type ReplayConsumer = StreamConsumer<RebalanceContext>;

/// Whether a delivery begun before `partition` was revoked still runs
/// (those that ended are forgotten). The polling loop looks again on every
/// tick, so one that ends without reporting cannot hold the partition.
fn still_running(
    orphaned: &mut HashMap<Partition, Vec<JoinHandle<()>>>,
    partition: &Partition,
) -> bool {
    let Some(tasks) = orphaned.get_mut(partition) else {
        return false;
    };
    tasks.retain(|task| !task.is_finished());
    if tasks.is_empty() {
        orphaned.remove(partition);
        return false;
    }
    true
}

fn consumer(
    config: &KafkaConfig,
    group_id: &str,
    revoked: mpsc::UnboundedSender<Vec<Partition>>,
) -> Result<ReplayConsumer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Short group timeouts: a worker joins (and a dead one is replaced)
        // in seconds. The loop below polls continuously, so a long
        // max.poll.interval is not needed.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "10000")
        .set("fetch.wait.max.ms", "100")
        .set("client.id", "backstop-replay")
        .create_with_context(RebalanceContext { revoked })
        .map_err(|e| format!("kafka consumer: {e}"))
}

impl KafkaReplayer {
    pub async fn run(
        self,
        config: KafkaConfig,
        group_id: String,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let (revoked_tx, mut revoked_rx) = mpsc::unbounded_channel();
        let consumer = consumer(&config, &group_id, revoked_tx)?;
        consumer
            .subscribe(&[config.topic.as_str()])
            .map_err(|e| format!("kafka subscribe to {}: {e}", config.topic))?;
        tracing::info!(topic = %config.topic, group = %group_id, "Kafka replay worker started");
        let this = Arc::new(self);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut queues: HashMap<Partition, PartitionQueue> = HashMap::new();
        // Deliveries still running for partitions revoked from under them.
        // A partition given back to this worker waits for them: its head,
        // read again from the committed offset, must not go out twice at
        // once, nor the record behind it before it.
        let mut orphaned: HashMap<Partition, Vec<JoinHandle<()>>> = HashMap::new();
        let mut generations = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut last_error_log: Option<Instant> = None;
        loop {
            // The lane that may start now, or `None`: look at every lane.
            let ready: Option<(Partition, String)> = tokio::select! {
                // Revocations first: a record of a new assignment must not
                // join the queue that the revocation before it drops.
                biased;
                _ = shutdown.cancelled() => break,
                Some(revoked) = revoked_rx.recv() => {
                    for partition in revoked {
                        if let Some(queue) = queues.remove(&partition) {
                            tracing::info!(topic = %partition.0, partition = partition.1, dropped = queue.buffered, "partition revoked");
                            orphaned.entry(partition).or_default().extend(queue.in_flight());
                        }
                    }
                    None
                }
                Some(done) = done_rx.recv() => {
                    match settle(&consumer, &mut queues, done, CommitMode::Async) {
                        Some(lane) => Some(lane),
                        None => continue,
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for lane in queues.values_mut().flat_map(|q| q.lanes.values_mut()) {
                        if lane.due.is_some_and(|due| due <= now) {
                            lane.due = None;
                        }
                    }
                    // Deliveries of partitions revoked for good end too.
                    forget_finished(&mut orphaned);
                    None
                }
                message = consumer.recv() => match message {
                    Ok(message) => {
                        let partition = (message.topic().to_string(), message.partition());
                        let new = usize::from(!queues.contains_key(&partition));
                        let bytes = buffer_bytes(queues.len() + new);
                        let queue = queues.entry(partition.clone()).or_insert_with(|| {
                            generations += 1;
                            PartitionQueue::new(generations)
                        });
                        let job = Job::from_message(&message, partition.clone());
                        let route = job.route.clone();
                        queue.push(job);
                        if queue.full(bytes) && !queue.paused {
                            queue.paused = set_paused(&consumer, &partition, true);
                            if queue.paused {
                                tracing::info!(topic = %partition.0, partition = partition.1, buffered = queue.buffered, bytes = queue.buffered_bytes, "Kafka partition paused until its buffered records drain");
                            }
                        }
                        Some((partition, route))
                    }
                    Err(e) => {
                        if last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                            tracing::warn!(error = %e, "Kafka consume error (logged every {ERROR_LOG_EVERY:?} at most)");
                            last_error_log = Some(Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        None
                    }
                },
            };
            // Start the head of every lane that is free to go.
            let candidates: Vec<(Partition, Option<String>)> = match ready {
                Some((partition, route)) => vec![(partition, Some(route))],
                None => queues.keys().map(|p| (p.clone(), None)).collect(),
            };
            for (partition, route) in candidates {
                let Some(queue) = queues.get_mut(&partition) else {
                    continue;
                };
                if still_running(&mut orphaned, &partition) {
                    continue;
                }
                let generation = queue.generation;
                match route {
                    Some(route) => {
                        if let Some(lane) = queue.lanes.get_mut(&route) {
                            this.start_head(lane, generation, &done_tx);
                        }
                    }
                    None => {
                        for lane in queue.lanes.values_mut() {
                            this.start_head(lane, generation, &done_tx);
                        }
                    }
                }
            }
        }
        // Deliveries under way end (each bounded by its route's timeouts;
        // a second stop signal ends the process) and what they finished is
        // committed: a stopping worker cuts no request off mid-delivery,
        // nor leaves one it delivered to be sent again by the partition's
        // next owner. Its partitions are paused, and the consumer is still
        // polled meanwhile: a member that stops polling for
        // `max.poll.interval.ms` is put out of the group, and its commits
        // refused.
        if let Ok(assigned) = consumer.assignment() {
            let _ = consumer.pause(&assigned);
        }
        // Paused for good: a buffer that drains must not resume its
        // partition (`settle`).
        for queue in queues.values_mut() {
            queue.paused = false;
        }
        loop {
            // Reports already in (the loop above stopped on the signal
            // first) are taken before anything is judged still running.
            while let Ok(done) = done_rx.try_recv() {
                settle(&consumer, &mut queues, done, CommitMode::Sync);
            }
            // Deliveries of revoked partitions are not cut off either,
            // though what they finish is no longer this worker's to commit.
            forget_finished(&mut orphaned);
            if !queues.values().any(PartitionQueue::delivering) && orphaned.is_empty() {
                break;
            }
            tokio::select! {
                Some(revoked) = revoked_rx.recv() => {
                    for partition in revoked {
                        if let Some(queue) = queues.remove(&partition) {
                            orphaned.entry(partition).or_default().extend(queue.in_flight());
                        }
                    }
                }
                // Nothing comes from paused partitions; a record fetched
                // before the pause is left to the partition's next owner.
                // An error (the broker gone) is not polled again at once.
                polled = consumer.recv() => {
                    if polled.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        // A delivery that ended between the last look and the check.
        while let Ok(done) = done_rx.try_recv() {
            settle(&consumer, &mut queues, done, CommitMode::Sync);
        }
        tracing::info!("Kafka replay worker stopped");
        Ok(())
    }

    /// Starts the delivery of a lane's head, when it is free to go.
    fn start_head(
        self: &Arc<Self>,
        lane: &mut Lane,
        generation: u64,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        if lane.in_flight.is_some() || lane.due.is_some() {
            return;
        }
        let Some(head) = lane.jobs.front_mut() else {
            return;
        };
        // An open circuit means the backend is known to be down: wait for
        // it to turn half-open instead of spending attempts.
        if let Some(open_for) = self.proxy.resilience.open_for(&head.route) {
            lane.due = Some(Instant::now() + open_for);
            return;
        }
        head.attempt += 1;
        let job = head.clone();
        let (this, done) = (self.clone(), done.clone());
        lane.in_flight = Some(tokio::spawn(async move {
            let (partition, route) = (job.partition.clone(), job.route.clone());
            let verdict = this.handle(job).await;
            let _ = done.send(Done {
                partition,
                route,
                generation,
                verdict,
            });
        }));
    }

    /// Delivers one record, or dead-letters it; never panics on its content.
    async fn handle(&self, job: Job) -> Verdict {
        if let Some((reason, attempts)) = &job.dead_letter {
            return self.dead_letter(&job, reason, *attempts).await;
        }
        let active = self.proxy.active.load_full();
        let replay = &active.config.replay;
        let record = match CaptureRecord::from_json(&job.payload) {
            Ok(r) => r,
            Err(e) => {
                return self.dead_letter(&job, &e.to_string(), job.attempt).await;
            }
        };
        let outcome = deliver_by_worker(&self.proxy, &active, &record, job.attempt).await;
        let sent = !matches!(outcome, Delivery::Busy(_));
        match outcome {
            Delivery::Delivered(status) => {
                self.count(&record.route, "delivered");
                self.counters.add_delivered();
                tracing::info!(id = %record.id, route = %record.route, attempt = job.attempt, status, "replayed from Kafka");
                Verdict::Finished
            }
            Delivery::Dead(reason) => self.dead_letter(&job, &reason, job.attempt).await,
            Delivery::Retry(reason) if job.attempt >= replay.max_attempts => {
                let reason = format!("{reason} (after {} attempts)", job.attempt);
                self.dead_letter(&job, &reason, job.attempt).await
            }
            Delivery::Retry(reason) | Delivery::Busy(reason) => {
                self.count(&record.route, if sent { "retry" } else { "busy" });
                let backoff = Backoff {
                    initial: replay.initial_delay,
                    max: replay.max_delay,
                    factor: 2.0,
                };
                let wait = backoff.delay(job.attempt);
                tracing::debug!(id = %record.id, attempt = job.attempt, %reason, ?wait, "replay failed; backing off");
                if sent {
                    Verdict::Later(wait)
                } else {
                    Verdict::Unsent(wait)
                }
            }
        }
    }

    /// Sends the record to the dead-letter topic with the reason; if that
    /// fails the write is tried again later (the record is not lost, nor
    /// delivered again). One the topic refuses for good (the `error` and
    /// `attempts` headers took a record near the size limit over it) is
    /// kept among this instance's spool's dead letters instead: tried again
    /// it would hold its route and partition for ever.
    async fn dead_letter(&self, job: &Job, reason: &str, attempts: u32) -> Verdict {
        let attempts_text = attempts.to_string();
        let outbound = Outbound {
            id: &job.id,
            route: &job.route,
            reason: &job.reason,
            payload: &job.payload,
        };
        let extra = [("error", reason), ("attempts", attempts_text.as_str())];
        match self
            .sink
            .send_to(&self.sink.dlq_topic, &outbound, &extra)
            .await
        {
            Ok(()) => {
                self.count(&job.route, "dead_letter");
                self.counters.add_dead();
                tracing::warn!(id = %job.id, route = %job.route, %reason, "replay gave up: dead letter");
                Verdict::Finished
            }
            Err(e) if e.refused => {
                // A record without an id (any producer can write the topic)
                // is named by its place, so it cannot replace another.
                let (topic, partition) = &job.partition;
                let id = match job.id.is_empty() {
                    true => format!("kafka-{topic}-{partition}-{}", job.offset),
                    false => job.id.clone(),
                };
                let kept = self.spool.keep_dead_letter(
                    &id,
                    &job.route,
                    job.payload.clone(),
                    attempts,
                    reason,
                );
                match kept.await {
                    Ok(()) => {
                        self.count(&job.route, "dead_letter");
                        self.counters.add_dead();
                        tracing::warn!(%id, route = %job.route, %reason, error = %e, "replay gave up: the dead-letter topic refuses the record, kept in the spool's dead letters");
                        Verdict::Finished
                    }
                    Err(spooled) => {
                        tracing::error!(%id, error = %e, %spooled, "cannot write the dead letter to the topic or the spool; will retry");
                        Verdict::DeadLetterUnwritten {
                            reason: reason.to_string(),
                            attempts,
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(id = %job.id, error = %e, "cannot write the dead-letter topic; will retry");
                Verdict::DeadLetterUnwritten {
                    reason: reason.to_string(),
                    attempts,
                }
            }
        }
    }

    /// Counts an outcome under the record's route, or under
    /// `(unconfigured)` for a route this configuration lacks: the name came
    /// from the topic (any producer's key or record), and each name would
    /// be a series for as long as the process runs.
    fn count(&self, route: &str, outcome: &str) {
        let configured = self.proxy.active.load().routes.get(route).is_some();
        let label = if configured { route } else { "(unconfigured)" };
        self.proxy.metrics.count_replay(label, outcome);
    }
}

/// A consumed message, owned, for a delivery task.
#[derive(Clone)]
struct Job {
    partition: Partition,
    offset: i64,
    attempt: u32,
    payload: Vec<u8>,
    id: String,
    route: String,
    reason: String,
    /// Why and after how many attempts it was given up, once its dead
    /// letter failed to be written.
    dead_letter: Option<(String, u32)>,
}

impl Job {
    fn from_message(message: &BorrowedMessage<'_>, partition: Partition) -> Job {
        use rdkafka::message::Headers;
        let header = |name: &str| -> String {
            message
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let (id, reason) = (header("id"), header("reason"));
        let route = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_else(|| header("route"));
        Job {
            partition,
            offset: message.offset(),
            attempt: 0,
            payload: message.payload().unwrap_or_default().to_vec(),
            id,
            route,
            reason,
            dead_letter: None,
        }
    }
}

fn partition_list(partition: &Partition, offset: Option<i64>) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    match offset {
        Some(o) => {
            let _ = list.add_partition_offset(&partition.0, partition.1, Offset::Offset(o));
        }
        None => {
            list.add_partition(&partition.0, partition.1);
        }
    }
    list
}

/// Pauses or resumes a partition; true when it worked.
fn set_paused(consumer: &ReplayConsumer, partition: &Partition, paused: bool) -> bool {
    let list = partition_list(partition, None);
    let result = if paused {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    if let Err(e) = &result {
        tracing::debug!(topic = %partition.0, partition = partition.1, error = %e, paused, "pause/resume failed (partition revoked?)");
    }
    result.is_ok()
}

/// Forgets the deliveries of revoked partitions that have ended.
fn forget_finished(orphaned: &mut HashMap<Partition, Vec<JoinHandle<()>>>) {
    orphaned.retain(|_, tasks| {
        tasks.retain(|task| !task.is_finished());
        !tasks.is_empty()
    });
}

/// Takes a delivery's verdict into its lane, and commits what its end
/// finished. `None` when its partition was revoked meanwhile (and perhaps
/// assigned again, a new queue): there is nothing to commit then.
fn settle(
    consumer: &ReplayConsumer,
    queues: &mut HashMap<Partition, PartitionQueue>,
    done: Done,
    mode: CommitMode,
) -> Option<(Partition, String)> {
    let bytes = buffer_bytes(queues.len());
    let queue = queues
        .get_mut(&done.partition)
        .filter(|q| q.generation == done.generation)?;
    let lane = queue.lanes.get_mut(&done.route)?;
    lane.in_flight = None;
    match done.verdict {
        Verdict::Finished => {
            if let Some(next_offset) = queue.finish(&done.route) {
                commit(consumer, &done.partition, next_offset, mode);
            }
            if queue.paused && queue.half_empty(bytes) {
                queue.paused = !set_paused(consumer, &done.partition, false);
            }
        }
        Verdict::Later(wait) => lane.due = Some(Instant::now() + wait),
        Verdict::Unsent(wait) => {
            if let Some(job) = lane.jobs.front_mut() {
                job.attempt = job.attempt.saturating_sub(1);
            }
            lane.due = Some(Instant::now() + wait);
        }
        Verdict::DeadLetterUnwritten { reason, attempts } => {
            if let Some(job) = lane.jobs.front_mut() {
                job.dead_letter = Some((reason, attempts));
            }
            lane.due = Some(Instant::now() + DEAD_LETTER_RETRY);
        }
    }
    Some((done.partition, done.route))
}

fn commit(consumer: &ReplayConsumer, partition: &Partition, next_offset: i64, mode: CommitMode) {
    let list = partition_list(partition, Some(next_offset));
    if let Err(e) = consumer.commit(&list, mode) {
        tracing::warn!(topic = %partition.0, partition = partition.1, error = %e, "offset commit failed; the record may be replayed again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(offset: i64, bytes: usize) -> Job {
        Job {
            partition: ("t".into(), 0),
            offset,
            attempt: 0,
            payload: vec![b'x'; bytes],
            id: offset.to_string(),
            route: "r".into(),
            reason: String::new(),
            dead_letter: None,
        }
    }

    #[test]
    fn a_partition_buffer_fills_by_records_or_by_bytes() {
        let bytes = buffer_bytes(1);
        assert_eq!(bytes, 32 << 20);
        let mut by_records = PartitionQueue::new(1);
        for offset in 0..BUFFER as i64 {
            assert!(!by_records.full(bytes));
            by_records.push(job(offset, 10));
        }
        assert!(by_records.full(bytes));
        // A megabyte record at a time: full long before 512 records.
        let mut by_bytes = PartitionQueue::new(1);
        for offset in 0..32 {
            by_bytes.push(job(offset, 1 << 20));
        }
        assert!(by_bytes.full(bytes));
        assert!(!by_bytes.half_empty(bytes));
        for _ in 0..17 {
            by_bytes.finish("r");
        }
        assert!(!by_bytes.full(bytes));
        assert!(by_bytes.half_empty(bytes), "15 MiB left");
        assert_eq!(by_bytes.buffered_bytes, 15 << 20);
    }

    /// Many partitions share the worker's budget, each keeping room for a
    /// record of Kafka's default size limit.
    #[test]
    fn partitions_share_the_workers_buffer_budget() {
        assert_eq!(buffer_bytes(4), 32 << 20);
        assert_eq!(buffer_bytes(16), 8 << 20);
        assert_eq!(buffer_bytes(48) * 48, (128 << 20) - (128 << 20) % 48);
        assert_eq!(buffer_bytes(1000), 2 << 20);
    }
}
