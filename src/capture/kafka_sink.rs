//! The Kafka sink: captured records go to the `failed-requests` topic with an
//! idempotent producer and `acks=all`; the client is answered only after the
//! delivery report. Message key = route name (order per route), Kafka headers
//! repeat `id`, `route` and `reason`.
//!
//! A send that fails or takes longer than `ack_timeout` is reported as an
//! error so the caller can fall back to the spool. If the broker acknowledges
//! it later anyway, the record exists twice; both copies carry the same id,
//! which replays send as `Idempotency-Key` (at-least-once, never lost).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;

/// Why a record did not reach Kafka.
#[derive(Debug)]
pub struct SendError {
    pub message: String,
    /// Kafka will never take this record (larger than its message size
    /// limit, or invalid to the broker): sending it again cannot help.
    pub refused: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.message
    }
}

/// A record as the sink sends it.
pub struct Outbound<'a> {
    pub id: &'a str,
    pub route: &'a str,
    pub reason: &'a str,
    pub payload: &'a [u8],
}

pub struct KafkaSink {
    /// Replaced when librdkafka reports a fatal error (e.g. the idempotent
    /// producer was fenced after a broker lost its state): a fatal producer
    /// never recovers by itself.
    producer: ArcSwap<FutureProducer>,
    /// Held while a broken producer is replaced, so that it is replaced
    /// once, not by each of the sends that fail on it.
    replacing: tokio::sync::Mutex<()>,
    client_config: ClientConfig,
    pub topic: String,
    pub dlq_topic: String,
    ack_timeout: Duration,
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, String> {
        let timeout_ms = config.ack_timeout.as_millis().max(1).to_string();
        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            // Small batches: captures are latency-sensitive (a client waits).
            .set("linger.ms", "2")
            .set("message.timeout.ms", &timeout_ms)
            .set("request.timeout.ms", &timeout_ms)
            .set("socket.connection.setup.timeout.ms", "2000")
            .set("client.id", "backstop");
        let producer: FutureProducer = client_config
            .create()
            .map_err(|e| format!("kafka producer: {e}"))?;
        Ok(KafkaSink {
            producer: ArcSwap::from_pointee(producer),
            replacing: tokio::sync::Mutex::new(()),
            client_config,
            topic: config.topic.clone(),
            dlq_topic: config.dlq_topic.clone(),
            ack_timeout: config.ack_timeout,
        })
    }

    /// Sends to the capture topic; returns once the broker acknowledged.
    pub async fn send(&self, record: &Outbound<'_>) -> Result<(), SendError> {
        self.send_to(&self.topic, record, &[]).await
    }

    /// Sends to `topic` with extra headers (e.g. the dead-letter reason).
    pub async fn send_to(
        &self,
        topic: &str,
        record: &Outbound<'_>,
        extra: &[(&str, &str)],
    ) -> Result<(), SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(3 + extra.len());
        for (key, value) in [
            ("id", record.id),
            ("route", record.route),
            ("reason", record.reason),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let message = FutureRecord::to(topic)
            .key(record.route)
            .payload(record.payload)
            .headers(headers);
        let hold = Hold(self, Some(self.producer.load_full()));
        let producer = hold.producer();
        let delivery = producer.send(message, Timeout::After(self.ack_timeout));
        match tokio::time::timeout(self.ack_timeout, delivery).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => {
                if let Some(reason) = producer_is_broken(producer, &e) {
                    self.replace_producer(producer, &reason).await;
                }
                Err(SendError {
                    message: format!("kafka delivery failed: {e}"),
                    refused: never_taken(&e),
                })
            }
            Err(_) => Err(SendError {
                message: format!("kafka did not acknowledge within {:?}", self.ack_timeout),
                refused: false,
            }),
        }
    }

    /// Replaces `broken` unless that is done already (every send queued on
    /// a broken producer fails the same way). Making a producer blocks (it
    /// starts a thread), so it is made off the runtime's threads.
    async fn replace_producer(&self, broken: &Arc<FutureProducer>, reason: &str) {
        let _alone = self.replacing.lock().await;
        if !Arc::ptr_eq(&self.producer.load(), broken) {
            return;
        }
        let config = self.client_config.clone();
        let made = tokio::task::spawn_blocking(move || config.create::<FutureProducer>()).await;
        match made {
            Ok(Ok(fresh)) => {
                tracing::warn!(%reason, "Kafka producer hit a fatal error; replaced it");
                let old = self.producer.swap(Arc::new(fresh));
                self.let_go(old);
            }
            Ok(Err(e)) => {
                tracing::error!(%reason, error = %e, "Kafka producer hit a fatal error and cannot be recreated")
            }
            Err(e) => tracing::error!(%reason, error = %e, "Kafka producer could not be recreated"),
        }
    }

    /// Drops a hold on `producer`: off the runtime's threads when it was
    /// replaced meanwhile, as the last hold's drop joins the producer's
    /// polling thread and flushes its queue (up to half a second).
    fn let_go(&self, producer: Arc<FutureProducer>) {
        if Arc::ptr_eq(&self.producer.load(), &producer) {
            return;
        }
        // Outside a runtime (a hold dropped as the process ends), where
        // there is no runtime thread to spare, it is dropped here.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || drop(producer));
        }
    }

    /// Connects to the brokers and learns the capture topic's leader before
    /// traffic arrives. Without it the first captures after a start wait for
    /// the idempotent producer's setup (measured: p99 ~0.9 s over the first
    /// five seconds of load, 5 ms once warm). Bounded by `ack_timeout`; a
    /// Kafka that does not answer is reported, not waited for.
    pub async fn warm_up(&self) {
        let producer = self.producer.load_full();
        let (topic, timeout) = (self.topic.clone(), self.ack_timeout);
        let fetched = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Timeout::After(timeout))
                .map(drop)
        })
        .await;
        match fetched {
            Ok(Ok(())) => tracing::info!(topic = %self.topic, "connected to Kafka"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Kafka not reachable at start: captures go to the spool until it is")
            }
            Err(e) => tracing::warn!(error = %e, "Kafka warm-up failed"),
        }
    }

    /// Waits for in-flight messages on shutdown.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.load().flush(Timeout::After(timeout));
    }
}

/// A send's hold on the producer it sends with, let go as
/// [`KafkaSink::let_go`] says also when the send is cancelled (a capture
/// whose client left).
struct Hold<'a>(&'a KafkaSink, Option<Arc<FutureProducer>>);

impl Hold<'_> {
    fn producer(&self) -> &Arc<FutureProducer> {
        // Set when made, taken only when dropped.
        self.1
            .as_ref()
            .expect("a hold holds its producer until dropped")
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Some(producer) = self.1.take() {
            self.0.let_go(producer);
        }
    }
}

/// Whether Kafka refuses the message for its size: the producer's own
/// `message.max.bytes` (1 MB by default, about 750 KB of body once encoded
/// in the record) or the broker's limit.
fn never_taken(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        // Larger than the topic's message size limit, or failing the
        // broker's own validation of the record (`INVALID_RECORD`, such as
        // a broker-side schema check): the same bytes fail the same way.
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// Whether the producer can no longer send: librdkafka's fatal errors, and
/// the idempotence errors a broker answers after losing producer state
/// (Tansu after a restart answers `ProducerFenced` forever otherwise).
fn producer_is_broken(producer: &FutureProducer, error: &KafkaError) -> Option<String> {
    if let Some((_, reason)) = producer.client().fatal_error() {
        return Some(reason);
    }
    match error.rdkafka_error_code() {
        Some(
            code @ (RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::InvalidProducerIdMapping),
        ) => Some(code.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_about_the_record_itself_give_it_up() {
        let cases = [
            (RDKafkaErrorCode::MessageSizeTooLarge, true),
            (RDKafkaErrorCode::MessageBatchTooLarge, true),
            (RDKafkaErrorCode::InvalidRecord, true),
            (RDKafkaErrorCode::RequestTimedOut, false),
            (RDKafkaErrorCode::NotLeaderForPartition, false),
            (RDKafkaErrorCode::TopicAuthorizationFailed, false),
            (RDKafkaErrorCode::MessageTimedOut, false),
        ];
        for (code, want) in cases {
            let error = KafkaError::MessageProduction(code);
            assert_eq!(never_taken(&error), want, "{code:?}");
        }
    }
}
