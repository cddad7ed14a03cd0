//! The dashboards in headless Chromium: each page renders, shows the routes
//! and numbers the admin API reports, its buttons act, and the console
//! stays free of errors. Screenshots go to target/test-artifacts/.

use std::time::Duration;

use serde_json::Value;

use crate::browser::Browser;
use crate::harness::{client, Backend, Backstop, Reply};

async fn get_json(url: String) -> Value {
    client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The value of the key figure labelled `label` on the page.
async fn kpi(browser: &Browser, label: &str) -> String {
    let script = format!(
        "const k = [...document.querySelectorAll('#kpis .kpi')]\
         .find((k) => k.querySelector('.label').innerText.trim().toLowerCase() === {}); \
         return k ? k.querySelector('.value').innerText.trim() : null",
        serde_json::json!(label.to_lowercase())
    );
    let value = browser.eval(&script).await;
    value
        .as_str()
        .unwrap_or_else(|| panic!("no key figure {label}: {value}"))
        .to_string()
}

fn no_errors(errors: Vec<String>, page: &str) {
    assert!(errors.is_empty(), "console errors on {page}: {errors:#?}");
}

#[tokio::test]
async fn stats_dashboard_shows_what_the_api_reports() {
    let backend = Backend::start(|seen| {
        if seen.uri.starts_with("/api/fail") {
            Reply::status(503)
        } else {
            Reply::ok("ok").delay(Duration::from_millis((seen.uri.len() % 7) as u64))
        }
    })
    .await;
    let toml = format!(
        "[[routes]]\nname = \"users\"\npath_prefix = \"/api\"\nupstreams = [{0:?}]\n\
         [routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false\n\
         [[routes]]\nname = \"billing\"\npath_prefix = \"/billing\"\nupstreams = [{0:?}]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let c = client();
    for i in 0..42 {
        c.get(bs.url(&format!("/api/users/{i}")))
            .send()
            .await
            .unwrap();
    }
    for _ in 0..4 {
        c.get(bs.url("/api/fail")).send().await.unwrap();
    }
    for i in 0..9 {
        c.get(bs.url(&format!("/billing/invoices/{i}")))
            .send()
            .await
            .unwrap();
    }
    let users = get_json(bs.admin_url("/api-stats?api=users")).await;
    assert_eq!(users["total"], 46);

    let browser = Browser::start().await;
    browser.goto(&bs.admin_url("/stats-dashboard")).await;
    browser
        .wait_for(
            "the routes table",
            "return document.querySelectorAll('#routes tbody tr').length === 2",
        )
        .await;
    let rows = browser.text("#routes tbody").await;
    assert!(rows.contains("users") && rows.contains("billing"), "{rows}");
    // Route, requests, success, failures, ...
    let users_cells = browser
        .eval(
            "return [...document.querySelectorAll('#routes tr[data-api=users] td')]\
             .map((td) => td.innerText.trim())",
        )
        .await;
    assert_eq!(users_cells[1], "46", "requests in {users_cells}");
    assert_eq!(users_cells[3], "4", "failures in {users_cells}");
    assert_eq!(kpi(&browser, "Requests").await, "46");
    assert_eq!(kpi(&browser, "Failures").await, "4");
    let paths = browser.text("#paths").await;
    assert!(
        paths.contains("/api/users/{id}") && paths.contains("42"),
        "{paths}"
    );
    let errors = browser.text("#errors").await;
    assert!(
        errors.contains("503") && errors.contains("/api/fail"),
        "{errors}"
    );
    let svg = browser
        .eval("return document.querySelectorAll('#chart svg rect').length")
        .await;
    assert!(svg.as_u64().unwrap() > 0, "chart drawn");
    browser.screenshot("stats-dashboard").await;

    // The period switch and route selection.
    browser.click("#period button[data-p=hourly]").await;
    browser
        .wait_for(
            "the hourly chart",
            "return document.getElementById('chart-title').innerText.includes('hour')",
        )
        .await;
    browser.click("#routes tr[data-api=billing]").await;
    browser
        .wait_for(
            "billing selected",
            "return document.querySelector('#paths').innerText.includes('/billing/invoices/{id}')",
        )
        .await;
    assert_eq!(kpi(&browser, "Requests").await, "9");
    assert_eq!(kpi(&browser, "Failures").await, "0");
    browser.screenshot("stats-dashboard-hourly-billing").await;
    browser.resize(420, 1000).await;
    browser.screenshot("stats-dashboard-narrow").await;
    no_errors(browser.console_errors(|_| false).await, "/stats-dashboard");
}

#[tokio::test]
async fn circuit_dashboard_resets_an_open_circuit() {
    let down = Backend::echo().await.stop().await;
    let toml = format!(
        "[[routes]]\nname = \"payments\"\npath_prefix = \"/pay\"\nupstreams = [\"http://{down}\"]\n\
         [routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false\n\
         [routes.circuit_breaker]\nfailure_threshold = 2\nreset_timeout = \"120s\"\n"
    );
    let bs = Backstop::start(&toml);
    let status = client()
        .get(bs.admin_url("/circuit-status"))
        .send()
        .await
        .unwrap()
        .status();
    let browser = Browser::start().await;

    assert_eq!(status, 200);
    for _ in 0..3 {
        client().get(bs.url("/pay/x")).send().await.unwrap();
    }
    let circuits = get_json(bs.admin_url("/circuit-status")).await;
    assert_eq!(circuits["circuits"][0]["state"], "open", "{circuits}");

    browser.goto(&bs.admin_url("/cb-dashboard")).await;
    browser
        .wait_for(
            "an open circuit",
            "return document.querySelector('.card[data-route=payments] .badge.open')",
        )
        .await;
    let countdown = browser
        .text(".card[data-route=payments] [data-countdown]")
        .await;
    assert!(countdown.ends_with(" s"), "countdown shown: {countdown}");
    browser.screenshot("cb-dashboard-open").await;
    browser
        .click(".card[data-route=payments] button.reset")
        .await;
    browser
        .wait_for(
            "the circuit closed",
            "return document.querySelector('.card[data-route=payments] .badge.closed')",
        )
        .await;
    let circuits = get_json(bs.admin_url("/circuit-status")).await;
    assert_eq!(circuits["circuits"][0]["state"], "closed");
    browser.screenshot("cb-dashboard-closed").await;
    no_errors(browser.console_errors(|_| false).await, "/cb-dashboard");
}

#[tokio::test]
async fn queue_dashboard_shows_the_backlog_and_requeues_a_dead_letter() {
    // Live: 503 (captured). Replay: 400 (dead letter). After requeue: 200.
    let backend = Backend::scripted(vec![
        Reply::status(503),
        Reply::status(400),
        Reply::status(200),
    ])
    .await;
    let toml = format!(
        "[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstreams = [{:?}]\n\
         [routes.retry]\nmax_attempts = 1\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let r = client()
        .post(bs.url("/orders/new"))
        .body("{\"item\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get_json(bs.admin_url("/queue")).await["dead_letters"] != 1 {
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = get_json(bs.admin_url("/queue/dead-letters")).await;
    let dead = &listed["dead_letters"][0];
    assert_eq!(dead["route"], "orders");
    assert_eq!(dead["method"], "POST");
    assert_eq!(dead["path"], "/orders/new");
    let id = dead["id"].as_str().unwrap().to_string();

    let browser = Browser::start().await;
    browser.goto(&bs.admin_url("/queue-dashboard")).await;
    browser
        .wait_for(
            "the dead letter row",
            &format!("return document.querySelector('#dead tr[data-id=\"{id}\"]')"),
        )
        .await;
    let row = browser.text("#dead tbody").await;
    assert!(
        row.contains("POST /orders/new") && row.contains("backend answered 400"),
        "{row}"
    );
    let kpis = browser.text("#kpis").await.to_lowercase();
    assert!(kpis.contains("dead letters\n1"), "{kpis}");
    browser.screenshot("queue-dashboard-dead-letter").await;

    browser
        .click(&format!("#dead tr[data-id=\"{id}\"] button.requeue"))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get_json(bs.admin_url("/queue")).await["replayed_total"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "requeued record not replayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.eval("const s = document.getElementById('refresh'); s.value = '2'; s.dispatchEvent(new Event('change')); return true").await;
    browser
        .wait_for(
            "the empty dead-letter list",
            "return document.querySelector('#dead tbody').innerText.includes('No dead letters')",
        )
        .await;
    assert_eq!(backend.hits(), 3);
    let kpis = browser.text("#kpis").await.to_lowercase();
    assert!(kpis.contains("replayed\n1"), "{kpis}");
    browser.screenshot("queue-dashboard-requeued").await;
    no_errors(browser.console_errors(|_| false).await, "/queue-dashboard");
}

#[tokio::test]
async fn dashboards_work_with_an_admin_token_given_in_the_url_fragment() {
    let backend = Backend::start(|_| Reply::ok("")).await;
    let toml = format!(
        "[server]\nadmin_token = \"tok-123\"\n[[routes]]\nname = \"guarded\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    client().get(bs.url("/x")).send().await.unwrap();
    let browser = Browser::start().await;
    // Without the token: the page asks for it.
    browser.goto(&bs.admin_url("/stats-dashboard")).await;
    browser
        .wait_for(
            "the token form",
            "return document.getElementById('auth').style.display === 'block'",
        )
        .await;
    let _ = browser.console().await; // the expected 401s
    browser.goto("about:blank").await;
    browser
        .goto(&bs.admin_url("/stats-dashboard#token=tok-123"))
        .await;
    browser
        .wait_for(
            "the guarded route",
            "return document.querySelector('#routes tr[data-api=guarded]')",
        )
        .await;
    let url = browser.eval("return location.href").await;
    assert!(
        !url.as_str().unwrap().contains("tok-123"),
        "token removed from the URL"
    );
    no_errors(
        browser.console_errors(|_| false).await,
        "/stats-dashboard with token",
    );
}
