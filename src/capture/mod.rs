//! Capture: a request that its backend could not take is written durably and
//! the client is told so — only after the write is durable.
//!
//! `record` is the format, `spool` the embedded store. The [`Capturer`]
//! decides where a record goes and builds the answer.

pub mod forwarder;
pub mod kafka_sink;
pub mod record;
pub mod spool;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, StatusCode};

use crate::classify::Failure;
use crate::config::ReplayConfig;
use crate::error::{ErrorCode, ProxyError};
use crate::outgoing::{Outgoing, OutgoingBody};
use crate::pipeline::RequestContext;
use crate::routing::Route;
use crate::stats::metrics::{self, Metrics, RouteReason};
use kafka_sink::{KafkaSink, Outbound};
use record::{CaptureRecord, CapturedRequest, ClientMeta};
use spool::{Destination, Spool};

pub const X_BACKSTOP_CAPTURE_ID: HeaderName = HeaderName::from_static("x-backstop-capture-id");

/// The answer to a capture attempt; both sides are proxy-made answers.
pub enum CaptureOutcome {
    Captured { id: String, answer: ProxyError },
    Failed(ProxyError),
}

/// Where captured requests go.
pub struct Capturer {
    pub spool: Arc<Spool>,
    /// With `[kafka]`: tried first; the spool is the fallback.
    pub kafka: Option<Arc<KafkaSink>>,
    metrics: Arc<Metrics>,
    /// `Retry-After` suggested to clients whose request was captured: the
    /// first replay's delay (`replay.initial_delay`), set again by reloads.
    retry_after_s: AtomicU64,
}

impl Capturer {
    pub fn new(
        spool: Arc<Spool>,
        kafka: Option<Arc<KafkaSink>>,
        metrics: Arc<Metrics>,
        replay: &ReplayConfig,
    ) -> Self {
        let capturer = Capturer {
            spool,
            kafka,
            metrics,
            retry_after_s: AtomicU64::new(0),
        };
        capturer.follow(replay);
        capturer
    }

    /// Takes the (reloaded) replay settings the capture answer quotes.
    pub fn follow(&self, replay: &ReplayConfig) {
        let secs = replay.initial_delay.as_secs().max(1);
        self.retry_after_s.store(secs, Ordering::Relaxed);
    }

    /// Builds the record of a failed request, stores it durably, and returns
    /// the answer for the client.
    pub async fn capture(
        &self,
        route: &Route,
        outgoing: Outgoing,
        failure: Failure,
        ctx: &RequestContext<'_>,
    ) -> CaptureOutcome {
        let body = match &outgoing.body {
            OutgoingBody::Buffered(b) => b.0.clone(),
            OutgoingBody::Streaming(_) => bytes::Bytes::new(),
        };
        let (id, headers) = match &outgoing.capturable {
            Some(c) => (c.id.clone(), &c.client_headers),
            None => (CaptureRecord::new_id(), outgoing.headers()),
        };
        let request = CapturedRequest::new(
            outgoing.method(),
            outgoing.original_path(),
            outgoing.original_query(),
            headers,
            &body,
            &route.config.capture.redact_headers,
        );
        let client = ClientMeta {
            addr: ctx.client.addr.to_string(),
            request_id: ctx.request_id().to_owned(),
            proto: Some(ctx.client.proto.to_owned()),
            host: outgoing
                .set
                .forwarding
                .host()
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
        };
        let record = CaptureRecord::new(
            id,
            route.name(),
            failure.reason(),
            ctx.attempts,
            request,
            client,
        );
        match self.store(&record).await {
            Ok(()) => {
                self.metrics
                    .captured
                    .get_or_create(&RouteReason {
                        route: route.name().to_string(),
                        reason: record.reason.clone(),
                    })
                    .inc();
                tracing::info!(route = %route.name(), capture_id = %record.id, reason = %record.reason, "request captured");
                CaptureOutcome::Captured {
                    answer: self.captured_answer(route, &record),
                    id: record.id,
                }
            }
            Err(e) => {
                self.metrics
                    .capture_failures
                    .get_or_create(&metrics::route(route.name()))
                    .inc();
                tracing::error!(route = %route.name(), error = %e, "capture failed: the request is lost to the client's retry");
                CaptureOutcome::Failed(
                    ProxyError::new(
                        ErrorCode::CaptureFailed,
                        "The backend is unavailable and the request could not be stored; please retry",
                    )
                    .with_field("captured", false),
                )
            }
        }
    }

    /// Stores a record durably: in Kafka when configured and acknowledging
    /// within `ack_timeout`, else in the spool (marked for forwarding to
    /// Kafka when Kafka is configured).
    pub async fn store(&self, record: &CaptureRecord) -> Result<(), spool::SpoolError> {
        let payload = record.to_json();
        let Some(kafka) = &self.kafka else {
            return self
                .spool
                .append(
                    &record.id,
                    &record.route,
                    payload,
                    Destination::Replay,
                    None,
                )
                .await;
        };
        // Captures still waiting here for Kafka go first: a new one queues
        // behind them (the forwarder sends them in order), or the topic
        // would have it ahead of older captures of its route.
        if let Some(place) = self.spool.join_kafka_backlog() {
            return self
                .fall_back(record, payload, Destination::Kafka, Some(place))
                .await;
        }
        let outbound = Outbound {
            id: &record.id,
            route: &record.route,
            reason: &record.reason,
            payload: &payload,
        };
        match kafka.send(&outbound).await {
            Ok(()) => Ok(()),
            Err(e) if e.refused => {
                // Kept and replayed from this instance's spool: forwarding
                // it to Kafka later would fail the same way.
                tracing::warn!(capture_id = %record.id, error = %e, "Kafka refuses this capture: it is replayed from the spool");
                self.fall_back(record, payload, Destination::Replay, None)
                    .await
            }
            Err(e) => {
                tracing::warn!(capture_id = %record.id, error = %e, "Kafka unavailable: capture goes to the spool");
                let place = self.spool.kafka_backlog_place();
                self.fall_back(record, payload, Destination::Kafka, Some(place))
                    .await
            }
        }
    }

    /// Stores a record in the spool in Kafka's stead, counted once stored;
    /// one bound for Kafka holds its `place` in the backlog until then
    /// (the spool's writer gives it up).
    async fn fall_back(
        &self,
        record: &CaptureRecord,
        payload: Vec<u8>,
        to: Destination,
        place: Option<spool::BacklogPlace>,
    ) -> Result<(), spool::SpoolError> {
        let stored = self
            .spool
            .append(&record.id, &record.route, payload, to, place);
        stored.await?;
        self.metrics.kafka_fallbacks.inc();
        Ok(())
    }

    fn captured_answer(&self, route: &Route, record: &CaptureRecord) -> ProxyError {
        let status = StatusCode::from_u16(route.config.capture.respond_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut answer = ProxyError::new(
            ErrorCode::Captured,
            "The backend is unavailable; the request was stored and will be delivered when it recovers",
        )
        .with_status(status)
        .with_field("captured", true)
        .with_field("capture_id", record.id.as_str());
        if let Ok(id) = HeaderValue::from_str(&record.id) {
            answer = answer.with_header(X_BACKSTOP_CAPTURE_ID, id);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            answer = answer.with_retry_after(self.retry_after_s.load(Ordering::Relaxed));
        }
        answer
    }
}
