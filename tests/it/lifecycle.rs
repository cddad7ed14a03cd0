//! Hot reload and graceful shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{client, Backend, Backstop, RawBackend, Reply};

fn one_route(upstream: &str) -> String {
    format!("[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstreams = [{upstream:?}]\n")
}

/// A process started by hand, for what the harness does not do (a signal
/// before it listens, a lower file limit, a `backstop replay`), its stderr
/// gathered; killed on drop.
struct Logged {
    child: std::process::Child,
    logs: Arc<std::sync::Mutex<String>>,
}

impl Logged {
    fn spawn(mut command: std::process::Command) -> Logged {
        let mut child = command
            .env_remove("KAFKA_BROKERS")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(std::sync::Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), logs.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        Logged { child, logs }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line holding `needle`; fails with the logs (and
    /// how the process ended, if it did).
    async fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?}; exit {:?}; logs:\n{}",
                self.child.try_wait(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let sent = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{sig}");
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn reload_under_load_fails_no_request_and_bad_files_are_refused() {
    let a = Backend::start(|_| Reply::ok("a")).await;
    let b = Backend::start(|_| Reply::ok("b")).await;
    let bs = Backstop::start(&one_route(&a.url()));
    let config_text = std::fs::read_to_string(&bs.config_path).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, failures, total) = (stop.clone(), failures.clone(), total.clone());
        let url = bs.url("/api/x");
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                total.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&bs.config_path, config_text.replace(&a.url(), &b.url())).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b_hits = b.hits();
    assert!(
        b_hits > 0,
        "after the reload traffic goes to the new upstream"
    );

    // An invalid file keeps the running configuration.
    std::fs::write(&bs.config_path, "[[routes]]\nname = 1\n").unwrap();
    bs.signal("HUP");
    bs.wait_for_log("reload refused", Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "of {} requests",
        total.load(Ordering::Relaxed)
    );
    assert!(
        b.hits() > b_hits,
        "still served by the last good configuration"
    );
    assert!(
        bs.logs()
            .contains("routes[0].name: invalid type: integer `1`"),
        "every error is logged"
    );
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    let a = Backend::start(|_| Reply::ok("a")).await;
    let b = Backend::start(|_| Reply::ok("b")).await;
    let bs = Backstop::start(&one_route(&a.url()));
    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    // mtime granularity: make sure the change is seen as a change.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&bs.config_path, text.replace(&a.url(), &b.url())).unwrap();
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_in_flight_requests() {
    let slow = Backend::start(|_| Reply::ok("finished").delay(Duration::from_millis(1500))).await;
    let mut bs = Backstop::start(&format!(
        "[server]\ndrain_timeout = \"10s\"\n\n{}",
        one_route(&slow.url())
    ));
    let url = bs.url("/api/slow");
    let in_flight = tokio::spawn(async move {
        client()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    slow.wait_for_hits(1, Duration::from_secs(5)).await;
    bs.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(bs.addr).await.is_err(),
        "no new connections are accepted while draining"
    );
    assert_eq!(in_flight.await.unwrap(), "finished");
    let code = tokio::task::block_in_place(|| bs.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "exits cleanly after draining");
}

/// A second SIGTERM during the drain stops the process at once instead of
/// after `drain_timeout` (a second Ctrl-C, or a supervisor's repeat).
#[tokio::test(flavor = "multi_thread")]
async fn a_second_stop_signal_ends_the_drain_at_once() {
    let hung = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(60))).await;
    let mut bs = Backstop::start(&format!(
        "[server]\ndrain_timeout = \"30s\"\n\n{}",
        one_route(&hung.url())
    ));
    let url = bs.url("/api/hung");
    let _in_flight = tokio::spawn(async move { client().get(url).send().await });
    hung.wait_for_hits(1, Duration::from_secs(5)).await;
    bs.signal("TERM");
    bs.wait_for_log("shutting down", Duration::from_secs(5))
        .await;
    bs.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        bs.is_running(),
        "the first signal drains; one right after it (systemd's ExecStop, then its KillSignal) is the same request"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    bs.signal("TERM");
    let code = tokio::task::block_in_place(|| bs.wait_exit(Duration::from_secs(5)));
    assert_eq!(code, Some(0), "the second signal ends the drain");
}

/// Idle upstream connections belong to the route table that opened them: a
/// reload must not leave them open forever (one leak per reload).
#[tokio::test]
async fn a_reload_closes_the_old_tables_idle_upstream_connections() {
    let backend = RawBackend::start(None).await;
    let bs = Backstop::start(&one_route(&backend.url()));
    let c = client();
    for _ in 0..3 {
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(backend.open(), 1, "one kept-alive connection");

    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while backend.open() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the old table's idle connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c.get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "ok",
        "the new table connects afresh"
    );
    assert_eq!(backend.open(), 1);
}

/// A connection whose answer was still streaming at a reload is closed once
/// the answer ends, not kept in the old table's idle list (which nothing
/// sweeps), even while another answer of the old table streams on.
#[tokio::test]
async fn a_connection_freed_after_a_reload_is_closed_not_kept_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let go_on = Arc::new(tokio::sync::Semaphore::new(0));
    let (counted, released) = (open.clone(), go_on.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (open, go_on) = (counted.clone(), released.clone());
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Each answer: its head and half its body, the rest when
                // the test lets one go on. Until the connection closes.
                while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab";
                    if conn.write_all(head).await.is_err() {
                        break;
                    }
                    go_on.acquire().await.unwrap().forget();
                    if conn.write_all(b"cd").await.is_err() {
                        break;
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let bs = Backstop::start(&one_route(&format!("http://{addr}")));
    let c = client();
    let first = c.get(bs.url("/api/a")).send().await.unwrap();
    let second = c.get(bs.url("/api/b")).send().await.unwrap();
    assert_eq!(open.load(Ordering::SeqCst), 2);
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    go_on.add_permits(1);
    let one_done = tokio::time::timeout(Duration::from_secs(5), first.text());
    assert_eq!(one_done.await.unwrap().unwrap(), "abcd");
    let started = std::time::Instant::now();
    while open.load(Ordering::SeqCst) > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the freed connection is kept open by the old table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    go_on.add_permits(1);
    assert_eq!(second.text().await.unwrap(), "abcd");
}

/// `backstop replay` stops as `backstop run` does: on SIGTERM it finishes
/// the record in delivery (so it is not delivered again by the next worker)
/// and exits 0; SIGHUP reloads instead of ending the process.
#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_replay_worker_finishes_its_delivery_on_sigterm_and_survives_sighup() {
    // One POST captured while the backend is down.
    let down = "[replay]\nenabled = false\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\n\
                upstreams = [\"http://127.0.0.1:1\"]\n[routes.retry]\nmax_attempts = 1\n";
    let bs = Backstop::start(down);
    let r = client()
        .post(bs.url("/api/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("x-backstop-capture-id"));
    let dir = bs.kill9();

    // The backend is back, and slow: the delivery is in flight for a while.
    let slow = Backend::start(|_| Reply::ok("done").delay(Duration::from_secs(3))).await;
    let config = dir.path().join("replay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = {:?}\n\n{}",
            dir.path().join("data"),
            one_route(&slow.url())
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"));
    command
        .args(["replay", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info");
    let mut worker = Logged::spawn(command);
    slow.wait_for_hits(1, Duration::from_secs(10)).await;

    worker.signal("HUP");
    worker
        .wait_for("configuration reloaded", Duration::from_secs(10))
        .await;
    worker.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let logs = worker.logs();
    assert_eq!(status.code(), Some(0), "a clean exit: {status:?}\n{logs}");
    assert!(logs.contains("replayed"), "the delivery finished:\n{logs}");
    assert!(logs.contains("replay worker stopped"), "{logs}");
    assert_eq!(slow.hits(), 1);

    // Delivered, so no longer queued: the next worker will not send it again.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["queue", "list", "--json", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

/// The admin token is read from the running configuration: a reload sets or
/// rotates it at once. Keys a reload cannot change are named in a warning.
#[tokio::test]
async fn a_reload_sets_the_admin_token_and_names_the_keys_that_wait_for_a_restart() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let bs = Backstop::start(&one_route(&backend.url()));
    let c = client();
    let queue = bs.admin_url("/queue");
    assert_eq!(c.get(&queue).send().await.unwrap().status(), 200);

    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    let with_token = text.replacen(
        "[server]\n",
        "[server]\nadmin_token = \"new-token\"\nheader_read_timeout = \"7s\"\n",
        1,
    );
    std::fs::write(&bs.config_path, with_token).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    assert_eq!(
        c.get(&queue).send().await.unwrap().status(),
        401,
        "the token set by the reload is required"
    );
    let r = c.get(&queue).bearer_auth("new-token").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let logs = bs.logs();
    assert!(
        logs.contains("take effect after a restart") && logs.contains("server.header_read_timeout"),
        "{logs}"
    );
    assert!(!logs.contains("new-token"), "the token is never logged");
}

/// Off loopback the admin API needs its token (DESIGN.md): a reload cannot
/// take it away by naming a loopback address it does not move to.
#[tokio::test]
async fn a_reload_cannot_remove_the_token_of_an_admin_api_bound_off_loopback() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let bs = Backstop::start(&format!(
        "[server]\nadmin_listen = \"0.0.0.0:0\"\nadmin_token = \"s3cret\"\n\n{}",
        one_route(&backend.url())
    ));
    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    let without = text
        .replace(
            "admin_listen = \"0.0.0.0:0\"",
            "admin_listen = \"127.0.0.1:0\"",
        )
        .replace("admin_token = \"s3cret\"\n", "");
    assert!(!without.contains("s3cret") && without.contains("127.0.0.1:0"));
    std::fs::write(&bs.config_path, without).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("reload refused", Duration::from_secs(5))
        .await;
    assert!(
        bs.logs()
            .contains("server.admin_token: the admin API is bound to 0.0.0.0"),
        "{}",
        bs.logs()
    );
    let c = client();
    let queue = format!("http://127.0.0.1:{}/queue", bs.admin.port());
    let refused = c.get(&queue).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    let r = c.get(&queue).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The scheme's name is case-insensitive.
    let r = c.get(&queue).header("authorization", "bearer s3cret");
    assert_eq!(r.send().await.unwrap().status(), 200);
}

/// `drain_timeout` is read when the drain starts: a reload changes it.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_timeout_in_effect_is_the_reloaded_one() {
    let hung = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(60))).await;
    let mut bs = Backstop::start(&format!(
        "[server]\ndrain_timeout = \"60s\"\n\n{}",
        one_route(&hung.url())
    ));
    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    std::fs::write(
        &bs.config_path,
        text.replace("drain_timeout = \"60s\"", "drain_timeout = \"1s\""),
    )
    .unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    let url = bs.url("/api/hung");
    let _in_flight = tokio::spawn(async move { client().get(url).send().await });
    hung.wait_for_hits(1, Duration::from_secs(5)).await;
    bs.signal("TERM");
    let code = tokio::task::block_in_place(|| bs.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "stopped after the reloaded 1 s, not 60 s");
    assert!(bs.logs().contains("drain timeout reached"));
}

/// `RUST_LOG` set but empty (`RUST_LOG: ${RUST_LOG}` in a compose file)
/// counts as unset: `log.level` applies, instead of no log at all (the
/// harness finds the ports in the "listening" lines).
#[tokio::test]
async fn an_empty_rust_log_leaves_log_level_in_charge() {
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(&one_route(&backend.url()), &[("RUST_LOG", "")]);
    let r = client().get(bs.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(bs.logs().contains("proxy listening on"), "{}", bs.logs());
}

/// A SIGHUP while Backstop is still starting (here Kafka's warm-up waits
/// for a broker that is not there) neither ends the process, as a signal
/// without a handler would, nor is lost: it reloads once the proxy listens.
#[tokio::test]
async fn a_sighup_during_start_up_does_not_end_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = dir.path().join("backstop.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n\
             [kafka]\nbrokers = \"{}\"\nack_timeout = \"3s\"\n\n{}",
            dir.path().join("data"),
            silent.local_addr().unwrap(),
            one_route("http://127.0.0.1:1")
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"));
    command
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info");
    let mut backstop = Logged::spawn(command);
    // The spool is opened right after the handler is installed, and well
    // before the warm-up ends.
    let spool = dir.path().join("data").join("spool.sqlite3");
    let started = std::time::Instant::now();
    while !spool.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "no spool");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backstop.signal("HUP");
    backstop
        .wait_for("configuration reloaded", Duration::from_secs(15))
        .await;
    assert!(backstop.logs().contains("proxy listening on"));
    assert!(
        backstop.child.try_wait().unwrap().is_none(),
        "still running"
    );
}

/// A configuration file swapped for another with the same modification
/// time (a Kubernetes ConfigMap's `..data` symlink, NixOS's store where
/// every file has the same time) is seen as changed, and reloaded.
#[tokio::test]
async fn a_config_swapped_for_one_with_the_same_time_is_reloaded() {
    let backend = Backend::echo().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let bs = Backstop::start_in(dir.clone(), &one_route(&backend.url()));
    let r = client().get(bs.url("/extra/x")).send().await.unwrap();
    assert_eq!(r.status(), 404, "no route yet");
    let running = std::fs::read_to_string(&bs.config_path).unwrap();
    let time = std::fs::metadata(&bs.config_path)
        .unwrap()
        .modified()
        .unwrap();
    let next = dir.path().join("next.toml");
    let extra = "\n[[routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nupstreams = [\"http://127.0.0.1:1\"]\n";
    std::fs::write(&next, running + extra).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&next)
        .unwrap()
        .set_modified(time)
        .unwrap();
    let link = dir.path().join("link.tmp");
    std::os::unix::fs::symlink(&next, &link).unwrap();
    std::fs::rename(&link, &bs.config_path).unwrap();
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    let r = client().get(bs.url("/extra/x")).send().await.unwrap();
    assert_eq!(r.status(), 502, "the new route's dead upstream");
}

/// Out of file descriptors (`ulimit -n 64`, then more clients than that),
/// the accept loop backs off and logs the spell once, not 20 times a
/// second, and accepts again once descriptors are free.
#[tokio::test]
async fn running_out_of_file_descriptors_is_logged_once_and_survived() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backstop.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n{}",
            dir.path().join("data"),
            one_route(&backend.url())
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new("bash");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec {} run -c {}",
            env!("CARGO_BIN_EXE_backstop"),
            config.display()
        ))
        .env("RUST_LOG", "info,backstop=debug");
    let mut backstop = Logged::spawn(command);
    backstop
        .wait_for("proxy listening on ", Duration::from_secs(10))
        .await;
    let logs = backstop.logs();
    let url = logs.split("proxy listening on ").nth(1).unwrap();
    let url = url.lines().next().unwrap().trim().to_string();
    let addr = url.trim_start_matches("http://").to_string();

    let mut clients = Vec::new();
    for _ in 0..80 {
        clients.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = backstop.logs().matches("accept failed").count();
    assert_eq!(failed, 1, "{}", backstop.logs());
    drop(clients);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = client().get(format!("{url}/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(backstop.logs().contains("accepting connections again"));
    assert!(
        backstop.child.try_wait().unwrap().is_none(),
        "still running"
    );
}
