//! `backstop check`: a table of invalid files and the exact errors listed.

use std::process::Command;

fn check(toml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("PROXY_URLS")
        .env_remove("REDIS_HOST")
        .env_remove("REDIS_PORT")
        .env_remove("REDIS_PASSWORD")
        .env_remove("KAFKA_BROKERS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

const ROUTE: &str =
    "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"http://127.0.0.1:1\"]\n";

#[test]
fn invalid_files_list_every_error_with_its_key() {
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("".into(), vec!["FILE: routes: at least one [[routes]] entry is required"]),
        (
            format!("[server]\nlisten = 8080\nmax_body_bytes = \"big\"\nbogus = 1\n{ROUTE}"),
            vec![
                "FILE: server.listen: invalid type: integer `8080`, expected a string",
                "FILE: server.max_body_bytes: invalid type: string \"big\", expected u64",
                "FILE: server.bogus: unknown key",
            ],
        ),
        (
            format!("[server]\nmax_body_bytes = 2048\nmax_buffered_bytes = 1024\n{ROUTE}"),
            vec![
                "FILE: server.max_buffered_bytes: must be at least max_body_bytes (2048): a body that size could never be buffered",
            ],
        ),
        (
            "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"htp:/x\", \"http://h/?q=1\"]\n".into(),
            vec![
                "FILE: routes[0].upstreams[0]: invalid URL \"htp:/x\": scheme must be http or https",
                "FILE: routes[0].upstreams[1]: invalid URL \"http://h/?q=***\": must not have a query",
            ],
        ),
        (
            "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"http://10.0.0.5:80800\", \"https://api:8o80/v1\", \"http://[::1]:8080\", \"http://h:\", \"http://user:secret@backend\"]\n".into(),
            vec![
                "FILE: routes[0].upstreams[4]: invalid URL \"http://user:***@backend\": credentials in upstream URLs are not supported, use headers",
                "FILE: routes[0].upstreams[0]: invalid URL \"http://10.0.0.5:80800\": the port must be a number from 1 to 65535",
                "FILE: routes[0].upstreams[1]: invalid URL \"https://api:8o80/v1\": the port must be a number from 1 to 65535",
            ],
        ),
        (
            format!("[server]\nworkers = 100000\nmax_header_bytes = 4294967296\nadmin_token = 834729384\n[replay]\nidempotency_header = \"Content-Length\"\n{ROUTE}headers = {{ \"X-Api-Key\" = 112358 }}\n"),
            vec![
                "FILE: server.max_header_bytes: must be from 8192 to 1048576",
                "FILE: server.workers: must be at most 1024",
                "FILE: server.admin_token: invalid type: integer, expected a string",
                "FILE: replay.idempotency_header: \"Content-Length\" frames or describes the request, or Backstop sets it: name a header of its own",
                "FILE: routes[0].headers: invalid type: integer, expected a string",
            ],
        ),
        (
            format!("[replay]\nidempotency_header = \"X-Backstop-Key\"\n{ROUTE}"),
            vec!["FILE: replay.idempotency_header: \"X-Backstop-Key\" frames or describes the request, or Backstop sets it: name a header of its own"],
        ),
        (
            format!("{ROUTE}{ROUTE}"),
            vec![
                "FILE: routes[1].name: duplicate route name \"a\" (also routes[0])",
                "FILE: routes[1].path_prefix: prefix \"/a\" overlaps routes[0] (\"a\"): same prefix and host",
            ],
        ),
        (
            "[[routes]]\nname = \"bad name\"\npath_prefix = \"a\"\n".into(),
            vec![
                "FILE: routes[0].name: \"bad name\": use letters, digits, '-', '_' and '.' only",
                "FILE: routes[0].path_prefix: \"a\" must start with '/'",
                "FILE: routes[0].upstreams: required: at least one http:// or https:// URL",
            ],
        ),
        (
            format!("{ROUTE}[routes.retry]\nmax_attempts = 0\nretry_on_errors = [\"gremlins\"]\ninitial_delay = \"soon\"\n[routes.circuit_breaker]\nreset_timeout = -1\n[routes.capture]\nrespond_status = 200\n[routes.cache]\nheader_strategy = \"some\"\nstore = \"redis\"\nenabled = true\n"),
            vec![
                "FILE: routes[0].capture.respond_status: expected 503 or 202, found 200",
                "FILE: routes[0].circuit_breaker.reset_timeout: expected a duration such as \"1s\" or a non-negative number, found an integer",
                "FILE: routes[0].retry.initial_delay: invalid duration \"soon\": ",
                "FILE: routes[0].retry.retry_on_errors: unknown error kind \"gremlins\"",
                "FILE: routes[0].retry.max_attempts: must be at least 1",
                "FILE: routes[0].cache.header_strategy: expected none, all or list, found \"some\"",
                "FILE: routes[0].cache.store: \"redis\" needs a [redis] section",
            ],
        ),
        (
            format!("[server]\nadmin_listen = \"0.0.0.0:9901\"\ntls_cert = \"/nonexistent.pem\"\n{ROUTE}tls_ca_file = \"/\"\n"),
            vec![
                "FILE: server.tls_key: required when tls_cert is set",
                "FILE: server.tls_cert: file /nonexistent.pem does not exist",
                "FILE: routes[0].tls_ca_file: / is not a file",
                "FILE: server.admin_listen: 0.0.0.0:9901 is not a loopback address: set server.admin_token",
            ],
        ),
        (
            format!("{ROUTE}[routes.proxy]\nuse_proxy = true\n[routes.rate_limit]\nkey = \"cookie\"\n"),
            vec![
                "FILE: routes[0].rate_limit.key: expected route, client_ip or header:<name>, found \"cookie\"",
                "FILE: routes[0].proxy.use_proxy: needs [outbound_proxies] urls (or PROXY_URLS)",
            ],
        ),
        (
            "[[routes]]\nname = \"a\"\npath_prefix = \"/a//b\"\nupstreams = [\"http://h\"]\n\
             [[routes]]\nname = \"b\"\npath_prefix = \"/b/../..\"\nupstreams = [\"http://h\"]\n\
             [[routes]]\nname = \"c\"\npath_prefix = \"/c;v=1\"\nupstreams = [\"http://h\"]\n\
             [[routes]]\nname = \"d\"\npath_prefix = \"/%64/./x\"\nupstreams = [\"http://h\"]\n\
             [[routes]]\nname = \"e\"\npath_prefix = \"/e//\"\nupstreams = [\"http://h\"]\n\
             [[routes]]\nname = \"f\"\npath_prefix = \"/f%2Fg\"\nupstreams = [\"http://h\"]\n\
             [[routes]]\nname = \"g\"\npath_prefix = \"/g%zz\"\nupstreams = [\"http://h\"]\n".into(),
            vec![
                "FILE: routes[0].path_prefix: \"/a//b\" would never match: request paths are matched as made canonical; write it as \"/a/b\"",
                "FILE: routes[1].path_prefix: \"/b/../..\" climbs above the root with '..'",
                "FILE: routes[2].path_prefix: \"/c;v=1\" must be a path, without '?', '#' or ';'",
                "FILE: routes[3].path_prefix: \"/%64/./x\" would never match: request paths are matched as made canonical; write it as \"/d/x\"",
                "FILE: routes[5].path_prefix: \"/f%2Fg\" has an escaped slash (%2F, %5C or \\), which server.escaped_slashes = \"reject\" refuses",
                "FILE: routes[6].path_prefix: \"/g%zz\" has a '%' that is not followed by two hex digits",
            ],
        ),
        (
            "[server]\nescaped_slashes = \"decode\"\n\
             [[routes]]\nname = \"f\"\npath_prefix = \"/f%2fg\"\nupstreams = [\"http://h\"]\n".into(),
            vec![
                "FILE: routes[0].path_prefix: \"/f%2fg\" would never match: request paths are matched as made canonical; write it as \"/f/g\"",
            ],
        ),
        (
            format!("[server]\nescaped_slashes = \"sometimes\"\n{ROUTE}"),
            vec!["FILE: server.escaped_slashes: expected \"reject\", \"keep\" or \"decode\", found \"sometimes\""],
        ),
        (
            format!("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\", \"lb.internal\", \"::1\", \"10.0.0.1/8\"]\n{ROUTE}"),
            vec![
                "FILE: server.trusted_proxies[1]: expected an IP address or a CIDR block such as \"10.0.0.0/8\", found \"10.0.0.0/33\"",
                "FILE: server.trusted_proxies[2]: expected an IP address or a CIDR block such as \"10.0.0.0/8\", found \"lb.internal\"",
                "FILE: server.trusted_proxies[4]: \"10.0.0.1/8\" has host bits set: the block is 10.0.0.0/8",
            ],
        ),
        (
            format!("[server]\ntrusted_proxies = \"10.0.0.0/8\"\n{ROUTE}"),
            vec!["FILE: server.trusted_proxies: invalid type: string \"10.0.0.0/8\", expected a sequence"],
        ),
        (
            format!("[stats]\npush_interval = \"10ms\"\n{ROUTE}"),
            vec!["FILE: stats.push_interval: must be between 100ms and 10m"],
        ),
        (
            format!("{ROUTE}[routes.headers]\n\"X-Extra\" = \"a\"\n\"x-extra\" = \"b\"\n\"Content-Length\" = \"5\"\nConnection = \"close\"\n"),
            vec![
                "FILE: routes[0].headers.x-extra: duplicate header name (names are case-insensitive)",
                "FILE: routes[0].headers.Content-Length: is set for each message or connection; it cannot be configured",
                "FILE: routes[0].headers.Connection: is set for each message or connection; it cannot be configured",
            ],
        ),
        (
            format!("[kafka]\nack_timeout = \"20m\"\ntopic = \"failed requests\"\ndlq_topic = \"..\"\n{ROUTE}"),
            vec![
                "FILE: kafka.ack_timeout: must be between 3ms and 15m",
                "FILE: kafka.topic: must be a Kafka topic name: letters, digits, '.', '_' and '-', at most 249, not \".\" or \"..\"",
                "FILE: kafka.dlq_topic: must be a Kafka topic name: letters, digits, '.', '_' and '-', at most 249, not \".\" or \"..\"",
            ],
        ),
        (
            format!("{ROUTE}[routes.headers]\nHost = \"user:pw@api.example\"\n"),
            vec!["FILE: routes[0].headers.Host: must be a host name or address with an optional port (host[:port]), without credentials"],
        ),
        (
            format!("{ROUTE}[routes.headers]\nhost = \"api.example:8o80\"\n"),
            vec!["FILE: routes[0].headers.host: must be a host name or address with an optional port (host[:port]), without credentials"],
        ),
        ("[server\nlisten=1".into(), vec!["FILE: invalid TOML at line 1, column 8: "]),

        (
            format!("[server]\nupstream_idle_timeout = \"0s\"\nidle_timeout = \"a while\"\ndrain_timeout = 0\n{ROUTE}"),
            vec![
                "FILE: server.idle_timeout: invalid duration \"a while\"",
                "FILE: server.drain_timeout: must be greater than 0",
                "FILE: server.upstream_idle_timeout: must be greater than 0",
            ],
        ),
        (
            format!("{ROUTE}body_read_timeout = \"0s\"\n"),
            vec!["FILE: routes[0].body_read_timeout: must be greater than 0"],
        ),
        (
            format!("[server]\nidle_timeout = \"200y\"\n{ROUTE}body_read_timeout = 1e20\n"),
            vec![
                "FILE: server.idle_timeout: must be at most 100 years",
                "FILE: routes[0].body_read_timeout: must be at most 100 years",
            ],
        ),
        (
            format!("[server]\nupstream_max_conns = 2000000\n{ROUTE}[routes.cache]\nlock_timeout = -1\n"),
            vec![
                "FILE: server.upstream_max_conns: must be at most 1000000 (0 = no cap)",
                "FILE: routes[0].cache.lock_timeout: expected a duration",
            ],
        ),
        (
            format!("[kafka]\nbrokers = \"\"\nack_timeout = \"5 parsecs\"\ndlq_topic = \"failed-requests\"\n[replay]\nidempotency_header = \"bad header\"\n{ROUTE}"),
            vec![
                "FILE: kafka.brokers: must not be empty",
                "FILE: kafka.ack_timeout: invalid duration \"5 parsecs\"",
                "FILE: kafka.dlq_topic: must not be the capture topic: the replay workers would read the dead letters back as captures",
                "FILE: replay.idempotency_header: invalid header name \"bad header\"",
            ],
        ),
        (
            format!("[otlp]\nendpoint = \"grpc://collector:4317\"\nsample_ratio = 1.5\ntimeout = \"0s\"\nservice_name = \" \"\nbogus = 1\n[otlp.headers]\n\"bad header\" = \"x\"\n{ROUTE}"),
            vec![
                "FILE: otlp.endpoint: invalid URL \"grpc://collector:4317\": scheme must be http or https",
                "FILE: otlp.sample_ratio: must be a number between 0.0 and 1.0",
                "FILE: otlp.timeout: must be greater than 0",
                "FILE: otlp.service_name: must not be empty",
                "FILE: otlp.headers.bad header: invalid header name",
                "FILE: otlp.bogus: unknown key",
            ],
        ),
        (
            format!("[otlp]\nendpoint = \"http://user:hunter2@collector/v1/traces\"\nsample_ratio = -0.1\ntimeout = \"soon\"\nheaders = \"x\"\n{ROUTE}"),
            vec![
                "FILE: otlp.endpoint: invalid URL \"http://user:***@collector/v1/traces\": put credentials in otlp.headers, not in the URL",
                "FILE: otlp.sample_ratio: must be a number between 0.0 and 1.0",
                "FILE: otlp.timeout: invalid duration \"soon\"",
                "FILE: otlp.headers: invalid type: string, expected a map",
            ],
        ),
        (
            format!("[otlp]\nendpoint = \"http:///v1/traces\"\nenabled = \"yes\"\n{ROUTE}"),
            vec![
                "FILE: otlp.endpoint: invalid URL \"http:///v1/traces\"",
                "FILE: otlp.enabled: invalid type: string \"yes\", expected a boolean",
            ],
        ),
        (
            format!("[redis]\nurl = \"redis://cache:abc\"\n{ROUTE}"),
            vec!["FILE: redis.url: invalid URL \"redis://cache:abc\": invalid port number"],
        ),
        (
            format!("[redis]\nurl = \"redis://:hunter2@cache:6379/db1\"\n{ROUTE}"),
            vec!["FILE: redis.url: invalid URL \"redis://:***@cache:6379/db1\": the path must be a database number, found \"db1\""],
        ),
        (
            format!("[outbound_proxies]\nurls = [\"HTTP://proxy:3128\", \"socks5://x:1\", \"http://u:pw@:3128\", \"http://u:pw@proxy:3128x\"]\n{ROUTE}[routes.proxy]\nuse_proxy = true\n"),
            vec![
                "FILE: outbound_proxies.urls[1]: expected http://[user:pass@]host:port, found \"socks5://x:1\"",
                "FILE: outbound_proxies.urls[2]: expected http://[user:pass@]host:port, found \"http://u:***@:3128\"",
                "FILE: outbound_proxies.urls[3]: expected http://[user:pass@]host:port, found \"http://u:***@proxy:3128x\"",
            ],
        ),
        (
            format!("[server]\nadmin_token = \" s3cret \"\n{ROUTE}[routes.health_check]\npath = \"/health check\"\n"),
            vec![
                "FILE: server.admin_token: use visible ASCII characters only (no spaces): no request could present it",
                "FILE: routes[0].health_check.path: \"/health check\" is not a valid request path (escape spaces and other characters as %XX)",
            ],
        ),
        // A password that was not percent-encoded is hidden all the same.
        (
            format!("[redis]\nurl = \"redis://:Zm9v/YmFy@cache:6379\"\n{ROUTE}"),
            vec!["FILE: redis.url: invalid URL \"redis://:***@cache:6379\": empty host"],
        ),
        (
            format!("{ROUTE}[routes.cache]\nenabled = true\ncacheable_status = [200, 206, 304, 103]\n"),
            vec![
                "FILE: routes[0].cache.cacheable_status[1]: 206 cannot be cached: it is a part of an answer, not the whole",
                "FILE: routes[0].cache.cacheable_status[2]: 304 cannot be cached: it is no answer of its own, only that the client's copy is current",
                "FILE: routes[0].cache.cacheable_status[3]: 103 cannot be cached: it is an interim answer",
            ],
        ),
        (
            format!("[redis]\nurl = \"redis://0.0.0.0:6379\"\n{ROUTE}"),
            vec!["FILE: redis.url: invalid URL \"redis://0.0.0.0:6379\": a wildcard address cannot be connected to; name the Redis host"],
        ),
        (
            format!("[redis]\nurl = \"http://cache:6379\"\n{ROUTE}"),
            vec!["FILE: redis.url: expected a redis:// URL, found \"http://cache:6379\""],
        ),
        // Zero durations that would turn a feature off or break it.
        (
            format!("[redis]\ntimeout = \"0s\"\n[kafka]\nack_timeout = 0\n[replay]\ninitial_delay = \"0ms\"\nmax_delay = 0\n{ROUTE}[routes.circuit_breaker]\nreset_timeout = 0\n[routes.retry]\ninitial_delay = \"0s\"\n"),
            vec![
                "FILE: redis.timeout: must be greater than 0",
                "FILE: kafka.ack_timeout: must be between 3ms and 15m",
                "FILE: replay.initial_delay: must be greater than 0",
                "FILE: routes[0].circuit_breaker.reset_timeout: must be greater than 0",
                "FILE: routes[0].retry.initial_delay: must be greater than 0",
            ],
        ),
        (
            format!("{ROUTE}host = \"api.example.com:8443\"\n[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstreams = [\"http://127.0.0.1:1\"]\nhost = \"\"\n"),
            vec![
                "FILE: routes[0].host: \"api.example.com:8443\" has a port: routes match the request's host without its port, so write \"api.example.com\"",
                "FILE: routes[1].host: must not be empty (leave host out to match every host)",
            ],
        ),
        (
            format!("[server]\nlisten = \"127.0.0.1:9901\"\n{ROUTE}"),
            vec!["FILE: server.admin_listen: 127.0.0.1:9901 overlaps listen (127.0.0.1:9901): the proxy and the admin API need different ports"],
        ),
        (
            format!("[server]\nlisten = \"0.0.0.0:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n{ROUTE}"),
            vec!["FILE: server.admin_listen: 127.0.0.1:9000 overlaps listen (0.0.0.0:9000)"],
        ),
    ];
    for (toml, expected) in cases {
        assert_lists_exactly(&toml, &expected);
    }
}

/// A TOML syntax error names its place, not the line's text: an invalid
/// escape is often in a password.
#[test]
fn a_toml_error_does_not_quote_the_line() {
    let toml = "[redis]\nurl = \"redis://:pa\\wSECRET@redis:6379\"\n";
    assert_lists_exactly(toml, &["FILE: invalid TOML at line 2, column "]);
    let (_, _, stderr) = check(toml);
    assert!(!stderr.contains("SECRET"), "{stderr}");
}

/// `check` refuses `toml` and lists these errors (each line contains one
/// of them), no more.
fn assert_lists_exactly(toml: &str, expected: &[impl AsRef<str>]) {
    let (code, _, stderr) = check(toml);
    assert_eq!(code, 2, "exit code for:\n{toml}\n{stderr}");
    for line in expected {
        let line = line.as_ref();
        assert!(
            stderr.contains(line),
            "missing {line:?} for:\n{toml}\ngot:\n{stderr}"
        );
    }
    let listed = stderr.lines().filter(|l| l.starts_with("FILE: ")).count();
    assert_eq!(
        listed,
        expected.len(),
        "error count for:\n{toml}\ngot:\n{stderr}"
    );
}

/// The contents of the TLS files are read by `check`, as `run` reads them,
/// and listed with the file's other errors: a CA file or certificate that
/// is no PEM, a key that does not match its certificate.
#[test]
fn tls_files_are_read_and_listed_with_the_other_errors() {
    let pki = crate::tls::make_pki();
    let other = crate::tls::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let junk = write("junk.pem", "not a certificate\n");
    let cert = write("cert.pem", &pki.cert_pem);
    let key = write("key.pem", &pki.key_pem);
    let wrong_key = write("other-key.pem", &other.key_pem);
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("[server]\nlisten = 8080\n{ROUTE}tls_ca_file = {junk:?}\n"),
            vec![
                "FILE: server.listen: invalid type: integer `8080`, expected a string".into(),
                format!("FILE: routes[0].tls_ca_file: no certificate found in {junk}"),
            ],
        ),
        (
            format!("[server]\ntls_cert = {junk:?}\ntls_key = {key:?}\n{ROUTE}"),
            vec![format!(
                "FILE: server.tls_cert: no certificate found in {junk}"
            )],
        ),
        // Listed with the file's other errors, not after they are fixed.
        (
            format!("[server]\nlisten = 8080\ntls_cert = {junk:?}\ntls_key = {key:?}\n{ROUTE}"),
            vec![
                "FILE: server.listen: invalid type: integer `8080`, expected a string".into(),
                format!("FILE: server.tls_cert: no certificate found in {junk}"),
            ],
        ),
        (
            format!("[server]\ntls_cert = {cert:?}\ntls_key = {junk:?}\n{ROUTE}"),
            vec![format!("FILE: server.tls_key: {junk}: ")],
        ),
        (
            format!("[server]\ntls_cert = {cert:?}\ntls_key = {wrong_key:?}\n{ROUTE}"),
            vec!["FILE: server.tls_key: does not match the certificate: ".into()],
        ),
    ];
    for (toml, expected) in cases {
        assert_lists_exactly(&toml, &expected);
    }
    // The same files, matched, pass; so does a CA file nothing reads (a
    // route without verification ignores it, as before).
    let toml = format!("[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n{ROUTE}");
    let (code, stdout, stderr) = check(&toml);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let toml = format!("{ROUTE}tls_ca_file = {junk:?}\ntls_verify = false\n");
    let (code, stdout, stderr) = check(&toml);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stderr.trim(),
        "warning: route a: TLS certificate verification is off for this route"
    );
}

/// What a valid file does that its operator must hear of is logged as the
/// process starts (it was once logged before logging was set up: lost).
#[tokio::test]
async fn turning_certificate_verification_off_is_logged_at_start() {
    let bs = crate::harness::Backstop::start(&format!("{ROUTE}tls_verify = false\n"));
    bs.wait_for_log(
        "TLS certificate verification is off for this route",
        std::time::Duration::from_secs(5),
    )
    .await;
}

/// `[otlp] enabled = true` needs a build with the exporter; the rest of
/// the section is checked the same way in every build.
#[test]
fn otlp_enabled_is_refused_only_by_a_build_without_the_exporter() {
    let toml = format!(
        "[otlp]\nenabled = true\nsample_ratio = 2\n[otlp.headers]\nauthorization = \"Bearer s3cret\"\n{ROUTE}"
    );
    let (code, stdout, stderr) = check(&toml);
    assert_eq!(code, 2, "{stderr}");
    let mut expected = vec!["FILE: otlp.sample_ratio: must be a number between 0.0 and 1.0"];
    if !cfg!(feature = "otlp") {
        expected.push(
            "FILE: otlp.enabled: this build has no OTLP exporter (build with --features otlp)",
        );
    }
    let listed: Vec<&str> = stderr.lines().filter(|l| l.starts_with("FILE: ")).collect();
    assert_eq!(listed.len(), expected.len(), "{stderr}");
    for line in expected {
        assert!(listed.contains(&line), "missing {line:?} in:\n{stderr}");
    }
    assert!(!format!("{stdout}{stderr}").contains("s3cret"));

    let (code, _, stderr) = check(&format!("[otlp]\nenabled = true\n{ROUTE}"));
    if cfg!(feature = "otlp") {
        assert_eq!(code, 0, "{stderr}");
    } else {
        assert_eq!(code, 2);
        assert!(stderr.contains("otlp.enabled: this build has no OTLP exporter"));
    }
}

#[test]
fn a_valid_file_passes_with_every_section() {
    let toml = r#"
[server]
listen = "127.0.0.1:8080"
workers = 1
request_ids = true
"#;
    // `request_ids` is not a key: the one error proves unknown keys are caught
    // even in an otherwise valid file.
    let (code, _, stderr) = check(&format!("{toml}{ROUTE}"));
    assert_eq!(code, 2);
    assert!(stderr.contains("server.request_ids: unknown key"));

    let full = format!(
        r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9901"
data_dir = "./data"
max_body_bytes = 1048576
connect_timeout = 2
upstream_idle_timeout = "30s"
upstream_max_idle = 64
upstream_max_conns = 512
send_timeout = "30s"
drain_timeout = "5s"
[log]
format = "json"
access_log = true
[redis]
url = "redis://127.0.0.1:6379"
[kafka]
brokers = "127.0.0.1:9092"
[outbound_proxies]
urls = ["http://user:pass@127.0.0.1:3128"]
[replay]
max_attempts = 5
initial_delay = 0.5
{ROUTE}
forward_headers = ["X-API-KEY"]
body_read_timeout = "5m"
[routes.capture]
respond_status = 202
redact_headers = ["Authorization"]
[routes.circuit_breaker]
request_timeout = 2500
[routes.retry]
retry_on_status = [503]
[routes.cache]
enabled = true
store = "redis"
header_strategy = "list"
headers = ["Accept"]
lock_timeout = "2s"
[routes.proxy]
use_proxy = true
strategy = "on_rate_limit"
[routes.rate_limit]
requests_per_second = 10
burst = 20
key = "header:X-Client"
[otlp]
enabled = {otlp}
endpoint = "https://collector.example:4318/v1/traces"
service_name = "edge"
sample_ratio = 0.25
timeout = "3s"
[otlp.headers]
authorization = "Bearer pass-token"
"#,
        otlp = cfg!(feature = "otlp"),
    );
    let (code, stdout, stderr) = check(&full);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("OK (1 routes)"));
    assert!(!stderr.contains("pass"), "credentials must not be printed");
}
