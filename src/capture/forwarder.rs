//! Store and forward: records that went to the spool because Kafka was down
//! or slow (`Destination::Kafka`) are sent to Kafka once it is back, oldest
//! first, and removed from the spool only after Kafka acknowledged them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::kafka_sink::{KafkaSink, Outbound};
use super::record::CaptureRecord;
use super::spool::{Destination, Spool};

const BATCH: usize = 256;
const POLL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub async fn run(spool: Arc<Spool>, sink: Arc<KafkaSink>, shutdown: CancellationToken) {
    let mut backoff = POLL;
    loop {
        let wait = match forward_batch(&spool, &sink).await {
            Ok(0) => {
                backoff = POLL;
                POLL
            }
            Ok(n) => {
                tracing::info!(records = n, "forwarded spooled captures to Kafka");
                backoff = POLL;
                Duration::ZERO
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Kafka still unavailable for spooled captures");
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Forwards up to one batch; returns how many went to Kafka. The batch's
/// sends are in flight together (queued in order: the idempotent producer
/// keeps that order per partition) and the forwarded records leave the
/// spool in one commit: one at a time, each a round trip to Kafka and an
/// fsync, a few hundred a second could not keep up with captures that
/// queue behind the backlog.
async fn forward_batch(spool: &Arc<Spool>, sink: &KafkaSink) -> Result<usize, String> {
    let reader = spool.clone();
    let rows = tokio::task::spawn_blocking(move || reader.queued(Destination::Kafka, BATCH))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // The reason header comes from the record; an unreadable record is
    // forwarded as it is and dead-lettered by the consumer.
    let reasons: Vec<String> = rows
        .iter()
        .map(|row| {
            CaptureRecord::from_json(&row.record)
                .map(|r| r.reason)
                .unwrap_or_default()
        })
        .collect();
    let sends = rows.iter().zip(&reasons).map(|(row, reason)| async move {
        let outbound = Outbound {
            id: &row.id,
            route: &row.route,
            reason,
            payload: &row.record,
        };
        sink.send(&outbound).await
    });
    let results = join_all(sends).await;
    let mut forwarded = Vec::new();
    let mut failed: Option<String> = None;
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => forwarded.push(spool.delete(&row.id)),
            // One record Kafka will never take must not hold up the ones
            // behind it: it is replayed from the spool instead.
            Err(e) if e.refused => {
                tracing::warn!(capture_id = %row.id, error = %e, "Kafka refuses this spooled capture: it is replayed from the spool");
                if let Err(e) = spool.replay_instead_of_kafka(Some(&row.id)).await {
                    failed.get_or_insert(e.to_string());
                }
            }
            Err(e) => {
                failed.get_or_insert(e.into());
            }
        }
    }
    // Whatever failed, what Kafka acknowledged leaves the spool: left
    // there, it would go to the topic a second time.
    let sent = forwarded.len();
    for deleted in join_all(forwarded).await {
        deleted.map_err(|e| e.to_string())?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(sent),
    }
}
