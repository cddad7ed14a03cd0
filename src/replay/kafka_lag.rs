//! The Kafka backlog: records in the capture topic that the replay group has
//! not committed yet (the sum over partitions of high watermark − committed
//! offset). Read on demand by `/queue` and `/metrics`; blocking calls, so
//! callers run it on a blocking thread.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// The longest one reading may take, all its calls together: `/metrics`
/// waits for it, and Prometheus gives a scrape 10 s by default.
const BUDGET: Duration = Duration::from_secs(2);
/// How long each reading first serves the client's queued events.
const SERVE_EVENTS_FOR: Duration = Duration::from_millis(5);

pub struct KafkaLag {
    consumer: BaseConsumer<Quiet>,
    topic: String,
    last: Mutex<LastRead>,
}

/// The last backlog read, and whether reading fails now.
#[derive(Default)]
struct LastRead {
    lag: Option<u64>,
    failing: bool,
}

impl KafkaLag {
    pub fn new(config: &KafkaConfig, group_id: &str) -> Result<KafkaLag, String> {
        // Never subscribes: it only reads the group's committed offsets.
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("client.id", "backstop-lag")
            .create_with_context(Quiet)
            .map_err(|e| format!("kafka lag reader: {e}"))?;
        Ok(KafkaLag {
            consumer,
            topic: config.topic.clone(),
            last: Mutex::new(LastRead::default()),
        })
    }

    /// Records not yet committed by the replay group; while Kafka does not
    /// answer, the last backlog read (a backlog does not vanish because
    /// Kafka is slow: alerts on the queue's depth would clear in the middle
    /// of an incident). `None` before any read succeeded.
    pub fn lag(&self) -> Option<u64> {
        self.serve_events();
        let read = self.read();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match read {
            Ok(lag) => {
                if last.failing {
                    tracing::info!(lag, "the Kafka backlog can be read again");
                }
                *last = LastRead {
                    lag: Some(lag),
                    failing: false,
                };
            }
            Err(error) => {
                if !last.failing {
                    tracing::warn!(%error, last = ?last.lag, "cannot read the Kafka backlog; the queue's depth counts the last one read");
                }
                last.failing = true;
            }
        }
        last.lag
    }

    /// Takes the client's queued events (its log lines, broker connection
    /// errors): a consumer with a group sends them to its own queue, which
    /// only a poll empties, and this one is never otherwise polled, so a
    /// long Kafka outage would pile them up for the life of the process.
    /// A poll with time left serves every event queued (one without
    /// returns after the first log line); it ends with the time, as this
    /// consumer subscribes to nothing, or at an error event.
    fn serve_events(&self) {
        let until = Instant::now() + SERVE_EVENTS_FOR;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.consumer.poll(left).is_none() {
                return;
            }
        }
    }

    fn read(&self) -> Result<u64, String> {
        let deadline = Instant::now() + BUDGET;
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(format!("no answer within {BUDGET:?}"))
            } else {
                Ok(left)
            }
        };
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), left()?)
            .map_err(|e| e.to_string())?;
        let mut list = TopicPartitionList::new();
        for topic in metadata.topics() {
            for partition in topic.partitions() {
                list.add_partition(&self.topic, partition.id());
            }
        }
        let committed = self
            .consumer
            .committed_offsets(list, left()?)
            .map_err(|e| e.to_string())?;
        let mut lag = 0u64;
        for element in committed.elements() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, element.partition(), left()?)
                .map_err(|e| e.to_string())?;
            lag += partition_lag(element.offset(), low, high);
        }
        Ok(lag)
    }
}

/// What of a partition is left to commit: from the committed offset (or,
/// without one, the first record kept) to the end. Records that retention
/// deleted below the committed offset are not waiting for anyone.
fn partition_lag(committed: Offset, low: i64, high: i64) -> u64 {
    let from = match committed {
        Offset::Offset(o) => o.max(low),
        _ => low,
    };
    u64::try_from(high - from).unwrap_or(0)
}

/// The lag reader's client context: its log lines and broker errors repeat
/// what the replay consumer and the capture producer say (and `lag` says
/// once per outage that reading fails), so they go to the debug log.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, facility, message, "Kafka lag reader");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka lag reader");
    }
}

impl ConsumerContext for Quiet {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_only_records_still_kept() {
        assert_eq!(partition_lag(Offset::Offset(5), 0, 12), 7);
        assert_eq!(partition_lag(Offset::Offset(5), 9, 12), 3, "5..9 deleted");
        assert_eq!(partition_lag(Offset::Invalid, 4, 12), 8, "none committed");
        assert_eq!(partition_lag(Offset::Offset(12), 0, 12), 0);
        assert_eq!(partition_lag(Offset::Offset(20), 0, 12), 0);
    }
}
