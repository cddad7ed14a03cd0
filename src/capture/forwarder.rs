//! Store and forward: records that went to the spool because Kafka was down
//! or slow (`Destination::Kafka`) are sent to Kafka once it is back, oldest
//! first, and removed from the spool only after Kafka acknowledged them.

use std::collections::HashSet;
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
    // Records Kafka acknowledged whose removal from the spool failed (a
    // full or read-only disk): only their removal is tried again, or each
    // try would put them in the topic once more.
    let mut acknowledged = HashSet::new();
    loop {
        let wait = match forward_batch(&spool, &sink, &mut acknowledged).await {
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
async fn forward_batch(
    spool: &Arc<Spool>,
    sink: &KafkaSink,
    acknowledged: &mut HashSet<String>,
) -> Result<usize, String> {
    let reader = spool.clone();
    let rows = tokio::task::spawn_blocking(move || reader.queued(Destination::Kafka, BATCH))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let (in_kafka, rows): (Vec<_>, Vec<_>) =
        (rows.into_iter()).partition(|row| acknowledged.contains(&row.id));
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
    let mut forwarded: Vec<&str> = in_kafka.iter().map(|row| row.id.as_str()).collect();
    let mut failed: Option<String> = None;
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => forwarded.push(&row.id),
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
    let deletes = forwarded.iter().map(|id| spool.delete(id));
    for (id, deleted) in forwarded.iter().zip(join_all(deletes).await) {
        match deleted {
            Ok(()) => {
                acknowledged.remove(*id);
            }
            Err(e) => {
                acknowledged.insert(id.to_string());
                failed.get_or_insert(format!(
                    "forwarded captures not removed from the spool: {e}"
                ));
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(sent),
    }
}
