//! Hot reload and graceful shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{client, Backend, Backstop, RawBackend, Reply};

fn one_route(upstream: &str) -> String {
    format!("[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstreams = [{upstream:?}]\n")
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
