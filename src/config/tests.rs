//! Unit tests of configuration loading: layering, durations, bounds, named errors.

use super::*;

#[test]
fn secrets_are_redacted_in_debug_output() {
    let config = Config { jwt_secret: Some(Secret::new("x".repeat(40))), ..Config::default() };
    assert!(!format!("{config:?}").contains("xxxx"));
}

#[test]
fn overrides_win_over_the_file_and_the_file_over_defaults() {
    let mut config = Config::default();
    let file: FileConfig = yaml_serde::from_str("listen: 127.0.0.1:9000\ningest: {maxBodyBytes: 4096}\n").unwrap();
    config.apply_file(file);
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.ingest.max_body_bytes, 4096);
    config.apply_overrides(Overrides { listen: Some("127.0.0.1:9100".parse().unwrap()), ..Default::default() });
    assert_eq!(config.listen.port(), 9100);
    assert_eq!(config.ingest.max_body_bytes, 4096);
}

#[test]
fn durations_are_read_from_text_and_bad_ones_named() {
    let file = parse_file_config("ingest: {idempotencyKeyTtl: 2h}\n").unwrap();
    assert_eq!(file.ingest.unwrap().idempotency_key_ttl, Duration::from_secs(7200));
    let err = parse_file_config("listen: 127.0.0.1:1\ningest:\n  idempotencyKeyTtl: soon\n").unwrap_err();
    assert!(err.starts_with("ingest.idempotencyKeyTtl: "), "{err}");
    assert!(err.contains("soon") && err.contains("line 3"), "{err}");
}

#[test]
fn ill_typed_settings_are_told_in_plain_words() {
    let err = parse_file_config("ingest:\n  maxBodyBytes: lots\n").unwrap_err();
    assert_eq!(err, "ingest.maxBodyBytes: must be a whole number from 0 to 18446744073709551615, not a text (line 2)");
    let err = parse_file_config("delivery:\n  workers: 2\n  leaseMargin: 30\n").unwrap_err();
    assert_eq!(err, "delivery.leaseMargin: `30` is not a duration like 30s, 5m or 24h (line 3)");
    let err = parse_file_config("controller: [resync]\n").unwrap_err();
    assert_eq!(err, "controller: must be a mapping, not a list (line 1)");
    // A secret in the wrong shape is never repeated.
    let err = parse_file_config("jwtSecret: [s3cret-s3cret-s3cret-s3cret-s3cret-s3cret]\n").unwrap_err();
    assert_eq!(err, "jwtSecret: must be a text, not a list (line 1)");
    let err = parse_file_config("jwtSecret: {value: s3cret}\n").unwrap_err();
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn unknown_file_fields_are_rejected_with_their_name() {
    let err = parse_file_config("lisen: x\n").unwrap_err();
    assert!(err.contains("lisen"), "{err}");
}

#[test]
fn the_jwt_leeway_is_read_from_the_file_and_bounded() {
    let file = parse_file_config("auth: {jwtLeeway: 30s}\n").unwrap();
    let mut config = Config::default();
    assert_eq!(config.auth.jwt_leeway, Duration::from_secs(5), "the documented default");
    config.apply_file(file);
    assert_eq!(config.auth.jwt_leeway, Duration::from_secs(30));
    assert!(config.validate().is_ok());
    for refused in [Duration::from_secs(301), Duration::from_millis(1500)] {
        config.apply_overrides(Overrides { jwt_leeway: Some(refused), ..Default::default() });
        assert!(config.validate().unwrap_err().to_string().contains("auth.jwtLeeway"), "{refused:?}");
    }
    let err = parse_file_config("auth: {jwtLeway: 5s}\n").unwrap_err();
    assert!(err.contains("jwtLeway"), "{err}");
}

#[test]
fn outage_bounds_are_read_from_the_file_and_too_small_ones_refused() {
    let config = Config::default();
    assert_eq!(config.database.acquire_timeout, Duration::from_secs(2), "the documented default");
    assert_eq!(config.ingest.commit_timeout, Duration::from_millis(2500), "the documented default");
    assert_eq!(config.controller.leader_check, Duration::from_secs(1), "the documented default");
    let mut config = Config::default();
    config.apply_file(
        parse_file_config("database: {acquireTimeout: 500ms}\ncontroller: {leaderCheck: 200ms}\n").unwrap(),
    );
    assert_eq!(config.database.acquire_timeout, Duration::from_millis(500));
    assert_eq!(config.controller.leader_check, Duration::from_millis(200));
    assert!(config.validate().is_ok());
    config.database.acquire_timeout = Duration::from_millis(10);
    assert!(config.validate().unwrap_err().to_string().contains("database.acquireTimeout"));
    let err = parse_file_config("database: {acquireTimeout: soon}\n").unwrap_err();
    assert!(err.starts_with("database.acquireTimeout: ") && err.contains("line 1"), "{err}");
}

#[test]
fn the_input_limits_are_read_from_the_file_and_checked() {
    let mut config = Config::default();
    config.apply_file(parse_file_config("apply: {maxNodes: 5000}\ningest: {maxJsonDepth: 10}\n").unwrap());
    let read = (config.apply.max_nodes, config.apply.max_documents, config.ingest.max_json_depth);
    assert_eq!(read, (5000, 1000, 10));
    config.ingest.max_json_depth = 101;
    assert!(config.validate().unwrap_err().to_string().contains("ingest.maxJsonDepth"));
    config.ingest.max_json_depth = 64;
    config.apply.max_depth = 200;
    assert!(config.validate().unwrap_err().to_string().contains("apply.maxDepth"));
}

#[test]
fn the_cel_limits_are_read_from_the_file_and_checked() {
    let mut config = Config::default();
    assert_eq!((config.cel.max_cost, config.cel.max_cpu_time), (100_000, Duration::from_millis(50)));
    config.apply_file(parse_file_config("cel: {maxCost: 5000, maxCpuTime: 20ms, regexSizeLimit: 65536}\n").unwrap());
    let budget = config.cel.budget();
    assert_eq!(
        (budget.max_cost, budget.max_cpu_time, budget.regex_size_limit),
        (5000, Duration::from_millis(20), 65536)
    );
    assert_eq!(config.cel.max_nodes, 500, "what the file leaves out keeps its default");
    config.validate().unwrap();
    config.cel.max_cpu_time = Duration::from_secs(60);
    assert!(config.validate().unwrap_err().to_string().contains("cel.maxCpuTime"));
    let err = parse_file_config("cel: {maxSteps: 1}\n").unwrap_err();
    assert!(err.contains("maxSteps"), "{err}");
}

#[test]
fn postgres_without_a_shared_jwt_secret_is_refused() {
    let config = Config { database_url: Some(Secret::new("postgres://localhost/x")), ..Config::default() };
    assert!(config.validate().unwrap_err().to_string().contains("HOOKWARDEN_JWT_SECRET"));
}

#[test]
fn unknown_event_types_are_accepted_unless_a_namespace_or_the_default_rejects_them() {
    let mut config = Config::default();
    assert_eq!(config.ingest.unknown_event_types_in("payments"), UnknownEventTypes::Accept);
    config.apply_file(
        parse_file_config("ingest: {unknownEventTypes: accept, unknownEventTypesByNamespace: {payments: reject}}\n")
            .unwrap(),
    );
    assert_eq!(config.ingest.unknown_event_types_in("payments"), UnknownEventTypes::Reject);
    assert_eq!(config.ingest.unknown_event_types_in("default"), UnknownEventTypes::Accept);
    config.validate().unwrap();
    let err = parse_file_config("ingest: {unknownEventTypes: refuse}\n").unwrap_err();
    assert!(err.starts_with("ingest.unknownEventTypes: "), "{err}");
    config.ingest.unknown_event_types_by_namespace.insert("Not A Label".into(), UnknownEventTypes::Reject);
    assert!(config.validate().unwrap_err().to_string().contains("unknownEventTypesByNamespace"));
}

#[test]
fn operational_events_and_the_console_are_read_from_the_file_and_checked() {
    let mut config = Config::default();
    assert_eq!(config.operational_events.failing_share, 0.5);
    config.apply_file(
        parse_file_config(
            "operationalEvents: {failingShare: 0.25, fanOutInterval: 20ms, deadLetters: 3, deadLetterWindow: 10m, approvalExpiringBefore: 1h}\nconsole: {publicUrl: 'https://console.example.com'}\n",
        )
        .unwrap(),
    );
    let o = &config.operational_events;
    assert_eq!((o.failing_share, o.fan_out_interval, o.dead_letters), (0.25, Duration::from_millis(20), 3));
    assert_eq!(
        (o.dead_letter_window, o.approval_expiring_before),
        (Duration::from_secs(600), Duration::from_secs(3600))
    );
    assert_eq!(config.console.public_url.as_deref(), Some("https://console.example.com"));
    config.validate().unwrap();
    for (bad, named) in [
        ("operationalEvents: {failingShare: 0}\n", "operationalEvents.failingShare"),
        ("operationalEvents: {failingShare: 1.5}\n", "operationalEvents.failingShare"),
        ("operationalEvents: {fanOutInterval: 1ms}\n", "operationalEvents.fanOutInterval"),
        ("operationalEvents: {deadLetters: 0}\n", "operationalEvents.deadLetters"),
        ("console: {publicUrl: 'ftp://console.example.com'}\n", "console.publicUrl"),
        ("console: {publicUrl: 'https://console.example.com/?a=1'}\n", "console.publicUrl"),
    ] {
        let mut config = Config::default();
        config.apply_file(parse_file_config(bad).unwrap());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(named), "{bad}: {err}");
    }
}

#[test]
fn namespace_defaults_and_retention_are_read_from_the_file_and_bad_ones_named() {
    let mut config = Config::default();
    config.apply_file(
        parse_file_config(
            "namespaceDefaults:\n  retention: {events: 2d}\n  dedupWindow: 12h\nretention: {period: 10s, batchSize: 50}\n",
        )
        .unwrap(),
    );
    assert_eq!(config.namespace_defaults.retention.events, Duration::from_secs(2 * 86400));
    assert_eq!(config.namespace_defaults.retention.attempts, Duration::from_secs(7 * 86400), "the rest default");
    assert_eq!(config.namespace_defaults.dedup_window, Duration::from_secs(12 * 3600));
    assert_eq!((config.retention.period, config.retention.batch_size), (Duration::from_secs(10), 50));
    assert!(config.validate().is_ok());
    let mut longer = config.clone();
    longer.namespace_defaults.dedup_window = Duration::from_secs(3 * 86400);
    let err = longer.validate().unwrap_err().to_string();
    assert!(err.contains("namespaceDefaults.dedupWindow"), "{err}");
    let mut batch = config.clone();
    batch.retention.batch_size = 0;
    assert!(batch.validate().unwrap_err().to_string().contains("retention.batchSize"));
    let err = parse_file_config("namespaceDefaults:\n  dedupWindow: never\n").unwrap_err();
    assert!(err.starts_with("namespaceDefaults.dedupWindow: "), "{err}");
}
