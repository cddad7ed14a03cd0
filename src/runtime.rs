//! Starting and running `backstop run`: listeners, the replay worker, hot
//! reload (SIGHUP or a change of the file) and graceful shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::cache::Caches;
use crate::capture::kafka_sink::KafkaSink;
use crate::capture::spool::Spool;
use crate::capture::{forwarder, Capturer};
use crate::config::{self, Config, ConfigErrors};
use crate::otel;
use crate::pipeline::{Active, Proxy};
use crate::replay::kafka_consumer::KafkaReplayer;
use crate::replay::kafka_lag::KafkaLag;
use crate::replay::{hand_kafkas_captures_over_if_free, ReplayCounters, SpoolReplayer};
use crate::resilience::Registry;
use crate::routing::RouteTable;
use crate::server::tls::ListenerCert;
use crate::server::{self, ConnSettings};
use crate::stats::metrics::Metrics;
use crate::stats::Stats;

/// How often the config file's modification time is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait for the last spans to reach the collector at shutdown.
const OTLP_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The listener's TLS as read at start: the acceptor, and the certificate
/// a reload reads again.
pub type ListenerTls = (TlsAcceptor, Arc<ListenerCert>);

/// Loads a file and builds its route table: everything `check` validates
/// but the listener's TLS files (a `queue` command need not be able to read
/// the key, and a reload reads them into the running listener itself).
pub fn load_active(path: &Path) -> Result<Active, ConfigErrors> {
    load_checked(path, false).map(|(active, _)| active)
}

/// [`load_active`], and with `read_listener_tls` the listener's certificate
/// and key too, read once, their errors listed with the rest (`check` and
/// `run`).
pub fn load_checked(
    path: &Path,
    read_listener_tls: bool,
) -> Result<(Active, Option<ListenerTls>), ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    };
    let (config, mut errors) = config::load_all(path);
    let Some(config) = config else {
        return Err(fail(errors));
    };
    // Unless the file's own check of those keys failed (a missing file).
    let tls_keys_valid = !errors.iter().any(|e| e.key.starts_with("server.tls_"));
    let mut tls = None;
    if read_listener_tls && tls_keys_valid {
        match listener_tls(&config, path) {
            Ok(read) => tls = read,
            Err(refused) => errors.extend(refused.errors),
        }
    }
    if !errors.is_empty() {
        return Err(fail(errors));
    }
    let routes = RouteTable::build(&config).map_err(fail)?;
    let active = Active {
        config: Arc::new(config),
        routes,
    };
    Ok((active, tls))
}

/// The proxy listener's TLS (`server.tls_cert`/`tls_key`), if it has one; a
/// reload reads the files again into the returned [`ListenerCert`].
fn listener_tls(config: &Config, path: &Path) -> Result<Option<ListenerTls>, ConfigErrors> {
    let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) else {
        return Ok(None);
    };
    let fail = |key: &str, message: String| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![config::ConfigError {
            key: format!("server.{key}"),
            message,
        }],
    };
    let listener_cert = Arc::new(ListenerCert::load(cert, key).map_err(|(k, m)| fail(k, m))?);
    let tls = server::tls::server_config(listener_cert.clone()).map_err(|m| fail("tls_cert", m))?;
    Ok(Some((TlsAcceptor::from(Arc::new(tls)), listener_cert)))
}

/// Runs the proxy until SIGTERM or SIGINT; returns the process exit code.
/// `loaded` is the file's [`FileStamp`] as it was read.
/// `tls`: the listener's, as [`load_checked`] read it.
pub async fn run(
    path: PathBuf,
    loaded: Option<FileStamp>,
    active: Active,
    tls: Option<ListenerTls>,
) -> Result<(), String> {
    // First of all: a SIGHUP without a handler ends the process, and the
    // start-up below can take seconds (the spool's lock, Kafka's warm-up).
    // One that comes meanwhile reloads once the proxy listens. (SIGTERM
    // and SIGINT keep ending a start-up at once: their handlers come
    // with the listeners.)
    let hangup = signal(SignalKind::hangup()).ok();
    let config = active.config.clone();
    let spool = Spool::open(&config.server.data_dir).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());
    let kafka = match &config.kafka {
        Some(k) => Some(Arc::new(KafkaSink::new(k)?)),
        None => None,
    };
    if let Some(sink) = &kafka {
        sink.warm_up().await;
    }
    let otel = otel::Tracing::start(&config.otlp, &metrics)?;
    let proxy = Arc::new(Proxy {
        active: ArcSwap::from_pointee(active),
        capturer: Some(Arc::new(Capturer::new(
            spool.clone(),
            kafka.clone(),
            metrics.clone(),
            &config.replay,
        ))),
        resilience: Arc::new(Registry::new(metrics.clone())),
        stats: Stats::start(metrics.clone()),
        caches: Caches::new(metrics.clone()),
        metrics,
        otel,
        buffers: Arc::default(),
    });
    let shutdown = CancellationToken::new();
    let connections = TaskTracker::new();
    let background = TaskTracker::new();

    let (tls, listener_cert) = tls.unzip();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = server::bind(config.server.listen, "proxy")
        .await
        .map_err(|e| e.to_string())?;
    let admin_listener = server::bind(config.server.admin_listen, "admin API")
        .await
        .map_err(|e| e.to_string())?;
    let proxy_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;

    let counters = Arc::new(ReplayCounters::default());
    let admin_state = AdminState {
        proxy: proxy.clone(),
        spool: spool.clone(),
        replay: counters.clone(),
        kafka_lag: match &config.kafka {
            Some(k) => Some(Arc::new(KafkaLag::new(k, &config.replay.group_id)?)),
            None => None,
        },
        on_loopback: admin_addr.ip().is_loopback(),
    };
    let admin_shutdown = shutdown.clone();
    background.spawn(async move {
        let app = admin::router(admin_state);
        let serve = axum::serve(admin_listener, app)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    if let (Some(sink), Some(kafka_config)) = (&kafka, &config.kafka) {
        background.spawn(forwarder::run(
            spool.clone(),
            sink.clone(),
            shutdown.clone(),
        ));
        if config.replay.enabled {
            let replayer = KafkaReplayer {
                proxy: proxy.clone(),
                sink: sink.clone(),
                spool: spool.clone(),
                counters: counters.clone(),
            };
            let (kafka_config, group) = (kafka_config.clone(), config.replay.group_id.clone());
            let stop = shutdown.clone();
            background.spawn(async move {
                if let Err(e) = replayer.run(kafka_config, group, stop).await {
                    tracing::error!("Kafka replay worker: {e}");
                }
            });
        }
    }
    if config.replay.enabled {
        // Also with Kafka: records requeued into the spool are replayed here.
        let mut replayer = SpoolReplayer::new(spool.clone(), proxy.clone(), counters.clone());
        if kafka.is_none() {
            // What a run with `[kafka]` left waiting for it, once this
            // process holds the replay lock: a process with `[kafka]` still
            // replaying this spool forwards them until then.
            replayer = replayer.taking_kafkas_captures();
        }
        background.spawn(replayer.run(shutdown.clone()));
    } else if kafka.is_none() {
        // Nothing here replays: they go to the spool's replay queue now
        // (for `backstop replay` or `queue replay`), unless a process that
        // replays this spool holds its lock, and takes them itself.
        hand_kafkas_captures_over_if_free(&spool).await;
    }
    let mut stop_signals = StopSignals::install();
    background.spawn(watch_config(
        path,
        loaded,
        hangup,
        proxy.clone(),
        listener_cert,
        shutdown.clone(),
    ));
    background.spawn(crate::resilience::health::run(
        proxy.clone(),
        shutdown.clone(),
    ));
    background.spawn(crate::stats::cluster::run(proxy.clone(), shutdown.clone()));

    connections.spawn(server::serve_proxy(
        listener,
        proxy.clone(),
        ConnSettings::from_config(&config.server),
        tls,
        shutdown.clone(),
        connections.clone(),
    ));
    tracing::info!("proxy listening on {scheme}://{proxy_addr}");
    tracing::info!("admin listening on http://{admin_addr}");

    stop_signals.recv().await;
    // The drain timeout in effect now: a reload may have changed it.
    let drain_timeout = proxy.active.load().config.server.drain_timeout;
    tracing::info!(?drain_timeout, "shutting down: draining in-flight requests (a second SIGTERM or SIGINT closes the remaining connections at once)");
    shutdown.cancel();
    connections.close();
    background.close();
    // An operator who signals again (a second Ctrl-C, or `kill` repeated by
    // a supervisor) wants the process gone now, not after `drain_timeout`.
    tokio::select! {
        _ = connections.wait() => {}
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain timeout reached; closing remaining connections");
        }
        _ = stop_signals.recv_second() => {
            tracing::warn!("second stop signal; closing remaining connections now");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    if let Some(sink) = &kafka {
        sink.flush(Duration::from_secs(2));
    }
    // Every request has finished: its spans are queued. Export them.
    proxy.otel.shutdown(OTLP_FLUSH_TIMEOUT).await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, registered at creation (so a signal that comes
/// before the wait is neither lost nor kills the process).
pub(crate) struct StopSignals {
    handlers: Option<(Signal, Signal)>,
    /// When the first signal came.
    first: Option<std::time::Instant>,
}

/// A signal this soon after the first is the same request to stop, not a
/// second one: systemd, for one, sends its `KillSignal` right after an
/// `ExecStop=` that signalled already.
const SAME_STOP: Duration = Duration::from_secs(1);

impl StopSignals {
    pub(crate) fn install() -> StopSignals {
        let handlers = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => {
                tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
                None
            }
        };
        StopSignals {
            handlers,
            first: None,
        }
    }

    /// Waits for the first SIGTERM or SIGINT.
    pub(crate) async fn recv(&mut self) {
        self.next().await;
        self.first = Some(std::time::Instant::now());
    }

    /// Waits for a second SIGTERM or SIGINT, at least [`SAME_STOP`] after
    /// the first.
    pub(crate) async fn recv_second(&mut self) {
        loop {
            self.next().await;
            if self.first.is_none_or(|first| first.elapsed() >= SAME_STOP) {
                return;
            }
        }
    }

    async fn next(&mut self) {
        match &mut self.handlers {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Reloads on SIGHUP and when the file changes from how it was when the
/// running configuration was read (`loaded`), once it has stayed the same
/// for one look (a file written in place, `cat >` or `scp`, is not read
/// half written). An invalid file keeps the running configuration; every
/// error is logged.
/// `listener_cert`: the TLS listener's certificate, read again by each
/// reload.
pub(crate) async fn watch_config(
    path: PathBuf,
    loaded: Option<FileStamp>,
    mut hangup: Option<Signal>,
    proxy: Arc<Proxy>,
    listener_cert: Option<Arc<ListenerCert>>,
    shutdown: CancellationToken,
) {
    // The version running, and the one the last look saw.
    let (mut applied, mut seen) = (loaded, loaded);
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    loop {
        let by_signal = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { match hangup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            _ = ticker.tick() => false,
        };
        let now = stamp(&path);
        let settled = now == seen;
        seen = now;
        if !by_signal && (now == applied || !settled) {
            continue;
        }
        applied = now;
        reload(&path, &proxy, listener_cert.as_deref());
    }
}

fn reload(path: &Path, proxy: &Proxy, listener_cert: Option<&ListenerCert>) {
    let old = proxy.active.load();
    let refused = |errors: &dyn std::fmt::Display| {
        for line in errors.to_string().lines() {
            tracing::error!("{line}");
        }
        tracing::error!("reload refused: keeping the running configuration");
    };
    let mut active = match load_active(path) {
        Ok(active) => active,
        Err(errors) => return refused(&errors),
    };
    let later = restart_only_changes(&old.config, &active.config);
    if !later.is_empty() {
        tracing::warn!(
            keys = later.join(", "),
            "changed keys take effect after a restart; they keep their running values"
        );
    }
    if old.config.otlp != active.config.otlp {
        tracing::warn!(
            "[otlp] changed: it takes effect after a restart; \
             the exporter keeps its running settings"
        );
    }
    keep_running(&old.config, Arc::make_mut(&mut active.config));
    let new = &active.config.server;
    if !new.admin_listen.ip().is_loopback() && new.admin_token.is_none() && !new.admin_insecure {
        return refused(&format!(
            "{}: server.admin_token: the admin API is bound to {}, not a loopback address: \
             a reload may not remove its token (set server.admin_insecure = true to allow that)",
            path.display(),
            new.admin_listen
        ));
    }
    // Last, as it takes effect at once: a renewed certificate, read again
    // even when its file names are the same.
    if let (Some(listener), Some(cert), Some(key)) = (listener_cert, &new.tls_cert, &new.tls_key) {
        if let Err((key, message)) = listener.reload(cert, key) {
            return refused(&format!("{}: server.{key}: {message}", path.display()));
        }
    }
    if let Some(capturer) = &proxy.capturer {
        capturer.follow(&active.config.replay);
    }
    let routes = active.config.routes.len();
    let active = Arc::new(active);
    let before = proxy.active.swap(active.clone());
    let moved = (proxy.resilience).close_moved_routes(&before.config.routes, &active.config.routes);
    for route in moved {
        tracing::info!(%route, "circuit closed: the reload gave the route other upstreams");
    }
    proxy.resilience.forget_all_but(&active.config.routes);
    proxy.caches.forget_all_but(&active.config.routes);
    tracing::info!(routes, "configuration reloaded");
    crate::routing::log_warnings(&active.config);
}

/// Gives `new` the running values of the keys read only at start (those of
/// [`restart_only_changes`], and `[otlp]`), so that the active config says
/// what is in effect, and later reloads compare with that.
fn keep_running(running: &Config, new: &mut Config) {
    let (r, n) = (&running.server, &mut new.server);
    n.listen = r.listen;
    n.admin_listen = r.admin_listen;
    n.workers = r.workers;
    n.data_dir.clone_from(&r.data_dir);
    n.max_header_bytes = r.max_header_bytes;
    n.header_read_timeout = r.header_read_timeout;
    n.idle_timeout = r.idle_timeout;
    n.send_timeout = r.send_timeout;
    // New certificate files apply (they are read again); TLS on or off not.
    if r.tls_cert.is_some() != n.tls_cert.is_some() {
        n.tls_cert.clone_from(&r.tls_cert);
        n.tls_key.clone_from(&r.tls_key);
    }
    new.log.format = running.log.format;
    new.log.level.clone_from(&running.log.level);
    new.kafka.clone_from(&running.kafka);
    new.replay.enabled = running.replay.enabled;
    new.replay.group_id.clone_from(&running.replay.group_id);
    new.otlp.clone_from(&running.otlp);
}

/// The keys read once at start (the listeners and their connection
/// settings, TLS on or off, the spool, Kafka, the logger, the replay
/// workers) that the new file changes. `[otlp]` has its own warning.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    let keys = [
        ("server.listen", o.listen != n.listen),
        ("server.admin_listen", o.admin_listen != n.admin_listen),
        ("server.workers", o.workers != n.workers),
        ("server.data_dir", o.data_dir != n.data_dir),
        (
            "server.max_header_bytes",
            o.max_header_bytes != n.max_header_bytes,
        ),
        (
            "server.header_read_timeout",
            o.header_read_timeout != n.header_read_timeout,
        ),
        ("server.idle_timeout", o.idle_timeout != n.idle_timeout),
        ("server.send_timeout", o.send_timeout != n.send_timeout),
        // Its files are read again by each reload; TLS on or off waits.
        (
            "server.tls_cert",
            o.tls_cert.is_some() != n.tls_cert.is_some(),
        ),
        ("log.format", old.log.format != new.log.format),
        ("log.level", old.log.level != new.log.level),
        ("kafka", old.kafka != new.kafka),
        ("replay.enabled", old.replay.enabled != new.replay.enabled),
        (
            "replay.group_id",
            old.replay.group_id != new.replay.group_id,
        ),
    ];
    keys.into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
}

/// What tells one version of the configuration file from another: its
/// times, its size and which file it is (a symlink is followed, so a
/// Kubernetes ConfigMap's swapped `..data` link shows as another file,
/// even with the same times, as on NixOS, where every file in the store
/// has the same modification time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    changed: (i64, i64),
    len: u64,
    file: (u64, u64),
}

/// The file's [`FileStamp`], if it can be read.
pub fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        changed: (m.ctime(), m.ctime_nsec()),
        len: m.len(),
        file: (m.dev(), m.ino()),
    })
}

/// The config's data directory, for commands that work on the spool alone.
pub fn data_dir(config: &Config) -> &Path {
    &config.server.data_dir
}
