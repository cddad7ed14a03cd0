//! Export: the SDK tracer provider, a bounded queue and one export task on
//! Backstop's runtime.
//!
//! Why not the SDK's `BatchSpanProcessor`: it exports on a thread of its
//! own under `futures::executor::block_on`, where hyper's tokio sockets do
//! not run, and it counts the spans it drops only for a log line at
//! shutdown. This processor does the same job in a few lines on the runtime
//! Backstop already has: `on_end` is a `try_send` into a channel of
//! [`QUEUE_SIZE`] spans (a full queue drops the span and counts it: a
//! request never waits for tracing), and the task sends what is queued in
//! batches of up to [`MAX_BATCH`] spans every schedule delay, or as soon as
//! a batch is full, one export at a time, each bounded by `otlp.timeout`.
//! The task never waits on the channel itself, so a span wakes nothing;
//! only a full batch does. While an export hangs, the queue fills and the
//! overflow is counted as `queue_full`; a failed export counts its spans as
//! `export_failed`.
//!
//! What is read from the environment (nothing else of OTEL_* is):
//! `OTEL_BSP_SCHEDULE_DELAY` (milliseconds between exports, default 5000;
//! an invalid value is logged and ignored). The SDK and the OTLP exporter
//! read some OTEL_* variables themselves; every one of them that could
//! change where spans go, what is sampled or what is sent is overridden
//! here by the `[otlp]` section (see `start`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, InstrumentationScope};
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanLimits,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::HyperClient;
use crate::config::OtlpConfig;
use crate::stats::metrics::{Metrics, ReasonLabel};

/// Spans waiting for export; more are dropped (and counted).
pub const QUEUE_SIZE: usize = 2048;
/// Spans per export request.
pub const MAX_BATCH: usize = 512;
/// Time between exports unless `OTEL_BSP_SCHEDULE_DELAY` says otherwise.
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);
const SCHEDULE_DELAY_VAR: &str = "OTEL_BSP_SCHEDULE_DELAY";

/// The running export task.
pub struct Exporter {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Builds the tracer and starts the export task.
pub fn start(config: &OtlpConfig, metrics: Arc<Metrics>) -> Result<(SdkTracer, Exporter), String> {
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .build();
    // The exporter encodes; the client sends to the configured endpoint
    // with the configured headers (and ignores OTEL_EXPORTER_OTLP_*).
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(HyperClient::new(config)?)
        .with_endpoint(config.endpoint.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(config.timeout)
        // One try per batch: the exporter waits between its own retries
        // with `std::thread::sleep` (its `tokio` feature is off), which
        // would stop one of the proxy's threads (with `workers = 1`, all
        // of it) for up to `timeout`. A failed batch is dropped, counted.
        .with_retry_policy(RetryPolicy::disabled())
        .build()
        .map_err(|e| format!("otlp: cannot build the exporter: {e}"))?;
    exporter.set_resource(&resource);

    let (queue, receiver) = mpsc::channel(QUEUE_SIZE);
    let batch_ready = Arc::new(Notify::new());
    let queue_full = dropped(&metrics, "queue_full");
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor {
            queue,
            batch_ready: batch_ready.clone(),
            queue_full,
        })
        // Set explicitly, so OTEL_TRACES_SAMPLER and OTEL_SPAN_* cannot
        // change them.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_span_limits(SpanLimits::default())
        .with_resource(resource)
        .build();
    let scope = InstrumentationScope::builder("backstop")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let tracer = provider.tracer_with_scope(scope);

    let stop = CancellationToken::new();
    let worker = Worker {
        exporter,
        delay: schedule_delay(),
        exported: metrics.otlp_spans_exported.clone(),
        failed: dropped(&metrics, "export_failed"),
        failing: false,
    };
    let task = tokio::spawn(worker.run(receiver, batch_ready, stop.clone()));
    Ok((
        tracer,
        Exporter {
            stop,
            task: Mutex::new(Some(task)),
        },
    ))
}

impl Exporter {
    /// Exports every queued span, then stops; gives up after `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        let Some(mut task) = task else { return };
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(
                ?timeout,
                "otlp: the collector did not take the last spans in time; they are dropped"
            );
        }
    }
}

fn dropped(metrics: &Metrics, reason: &str) -> Counter {
    metrics
        .otlp_spans_dropped
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .clone()
}

fn schedule_delay() -> Duration {
    let Ok(text) = std::env::var(SCHEDULE_DELAY_VAR) else {
        return DEFAULT_SCHEDULE_DELAY;
    };
    match text.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Duration::from_millis(ms),
        _ => {
            tracing::warn!(
                value = %text,
                "otlp: {SCHEDULE_DELAY_VAR} is not a positive number of milliseconds; using 5000"
            );
            DEFAULT_SCHEDULE_DELAY
        }
    }
}

/// Hands each ended, sampled span to the export task without waiting.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    /// Wakes the export task once a batch is waiting.
    batch_ready: Arc<Notify>,
    queue_full: Counter,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.try_send(span) {
            Ok(()) => {
                if QUEUE_SIZE - self.queue.capacity() >= MAX_BATCH {
                    self.batch_ready.notify_one();
                }
            }
            Err(TrySendError::Full(_)) => {
                self.queue_full.inc();
            }
            // After shutdown: no request is left to make spans.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// Never blocks: the flush at shutdown is `Exporter::shutdown`, awaited
    /// by `runtime` (this is also what runs when the provider is dropped).
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task's state.
struct Worker {
    exporter: opentelemetry_otlp::SpanExporter,
    delay: Duration,
    exported: Counter,
    failed: Counter,
    /// Whether the last export failed (failures are logged when they start
    /// and when they end, not once per batch).
    failing: bool,
}

impl Worker {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<SpanData>,
        batch_ready: Arc<Notify>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut tick = tokio::time::interval(self.delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = batch_ready.notified() => {}
                _ = tick.tick() => {}
            }
            // Everything queued now, in batches.
            while let Ok(span) = queue.try_recv() {
                batch.push(span);
                if batch.len() >= MAX_BATCH {
                    self.export(&mut batch).await;
                }
            }
            if !batch.is_empty() {
                self.export(&mut batch).await;
            }
        }
        // Shutdown: what is queued now goes out, then nothing more.
        queue.close();
        while let Some(span) = queue.recv().await {
            batch.push(span);
            if batch.len() >= MAX_BATCH {
                self.export(&mut batch).await;
            }
        }
        if !batch.is_empty() {
            self.export(&mut batch).await;
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanData>) {
        let spans = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        let count = spans.len() as u64;
        match self.exporter.export(spans).await {
            Ok(()) => {
                self.exported.inc_by(count);
                if self.failing {
                    self.failing = false;
                    tracing::info!("otlp: the collector takes spans again");
                }
            }
            Err(e) => {
                self.failed.inc_by(count);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        error = %e,
                        "otlp: export failed; spans are dropped (backstop_otlp_spans_dropped_total) until the collector answers"
                    );
                } else {
                    tracing::debug!(error = %e, spans = count, "otlp: export failed");
                }
            }
        }
    }
}
