//! The Kafka backlog: records in the capture topic that the replay group has
//! not committed yet (the sum over partitions of high watermark − committed
//! offset). Read on demand by `/queue` and `/metrics`; blocking calls, so
//! callers run it on a blocking thread.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

const TIMEOUT: Duration = Duration::from_secs(2);

pub struct KafkaLag {
    consumer: BaseConsumer,
    topic: String,
}

impl KafkaLag {
    pub fn new(config: &KafkaConfig, group_id: &str) -> Result<KafkaLag, String> {
        // Never subscribes: it only reads the group's committed offsets.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("client.id", "backstop-lag")
            .create()
            .map_err(|e| format!("kafka lag reader: {e}"))?;
        Ok(KafkaLag {
            consumer,
            topic: config.topic.clone(),
        })
    }

    /// Records not yet committed by the replay group.
    pub fn lag(&self) -> Result<u64, String> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), TIMEOUT)
            .map_err(|e| e.to_string())?;
        let mut list = TopicPartitionList::new();
        for topic in metadata.topics() {
            for partition in topic.partitions() {
                list.add_partition(&self.topic, partition.id());
            }
        }
        let committed = self
            .consumer
            .committed_offsets(list, TIMEOUT)
            .map_err(|e| e.to_string())?;
        let mut lag = 0u64;
        for element in committed.elements() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, element.partition(), TIMEOUT)
                .map_err(|e| e.to_string())?;
            let from = match element.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            lag += (high - from).max(0) as u64;
        }
        Ok(lag)
    }
}
