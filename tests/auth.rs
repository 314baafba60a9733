//! Authentication with the real binary: `hookwarden token` signs only with a key that
//! exists (the environment, the config file, or the key file `serve` generated) and says
//! which; expired tokens are refused after the configured leeway and no later.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Process, TestDb, JWT_SECRET};
use hookwarden::auth::{Claims, TokenKeys};
use hookwarden::config::Secret;

/// `hookwarden ARGS` in `cwd` with no key, config, data directory or database in its
/// environment, plus `env`.
fn hookwarden(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookwarden"));
    command.args(args).current_dir(cwd);
    for name in ["HOOKWARDEN_JWT_SECRET", "HOOKWARDEN_CONFIG", "HOOKWARDEN_DATA_DIR", "DATABASE_URL"] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.output().expect("run hookwarden")
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        walk(dir).into_iter().map(|p| p.strip_prefix(dir).unwrap().display().to_string()).collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Stdout is the token alone, on one line, so `$(hookwarden token …)` is the token.
fn the_token(output: &Output) -> String {
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "exit {:?}: {}{stdout}", output.status.code(), text(&output.stderr));
    let token = stdout.strip_suffix('\n').expect("one line");
    assert!(!token.contains('\n') && token.split('.').count() == 3, "stdout is not one JWT: {stdout:?}");
    token.to_owned()
}

#[test]
fn token_without_any_key_fails_names_where_it_looked_and_creates_nothing() {
    let cwd = tempfile::tempdir().unwrap();
    let output = hookwarden(cwd.path(), &["token", "--sub", "you", "--role", "admin"], &[]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "minted a token with no key: {}", text(&output.stdout));
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    assert!(stderr.contains("HOOKWARDEN_JWT_SECRET"), "{stderr}");
    let default_key = cwd.path().join(".hookwarden").join("jwt-secret");
    assert!(stderr.contains(&default_key.display().to_string()), "the key file path is not named: {stderr}");
    assert_eq!(files_in(cwd.path()), Vec::<String>::new(), "token created files");

    // The same with an explicit data directory that exists but holds no key.
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let output = hookwarden(cwd.path(), &["token", "--sub", "you", "--role", "admin", "--data-dir", dir], &[]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&data.path().join("jwt-secret").display().to_string()), "{stderr}");
    assert_eq!(files_in(data.path()), Vec::<String>::new());
}

#[tokio::test]
async fn token_signs_with_the_key_serve_generated_and_names_the_key_file() {
    let db = TestDb::sqlite();
    let TestDb::Sqlite { dir } = &db else { unreachable!() };
    let mut command = Process::command(&db, &[]);
    command.env_remove("HOOKWARDEN_JWT_SECRET");
    let server = Process::try_start(command).unwrap_or_else(|failed| panic!("{failed}"));
    let key_file = dir.path().join("jwt-secret");
    let cwd = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let output = hookwarden(cwd.path(), &["token", "--sub", "you", "--role", "admin", "--data-dir", data_dir], &[]);
    let status = match output.status.success() {
        true => {
            let token = text(&output.stdout);
            let response = reqwest::Client::new()
                .get(format!("{}/v1/resources/RetryBudget", server.base))
                .bearer_auth(token.trim())
                .send()
                .await
                .unwrap();
            Some(response.status().as_u16())
        }
        false => None,
    };
    server.kill();
    assert!(key_file.exists(), "serve generates the key");
    the_token(&output);
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&key_file.display().to_string()), "the key source is not named: {stderr}");
    assert_eq!(status, Some(200), "the server accepts the token");

    // With the server gone, the key file alone is enough.
    let output =
        hookwarden(cwd.path(), &["token", "--sub", "you", "--role", "viewer"], &[("HOOKWARDEN_DATA_DIR", data_dir)]);
    the_token(&output);
    assert!(files_in(cwd.path()).is_empty());
}

#[test]
fn token_names_the_environment_or_the_config_file_as_its_key_source() {
    let cwd = tempfile::tempdir().unwrap();
    let keys = TokenKeys::new(&Secret::new(JWT_SECRET));
    let output = hookwarden(
        cwd.path(),
        &["token", "--sub", "env", "--role", "ingest"],
        &[("HOOKWARDEN_JWT_SECRET", JWT_SECRET)],
    );
    let token = the_token(&output);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("environment") && stderr.contains("HOOKWARDEN_JWT_SECRET"), "{stderr}");
    assert_eq!(keys.authenticate(Some(&format!("Bearer {token}"))).unwrap().subject, "env");

    let config = cwd.path().join("hookwarden.yaml");
    std::fs::write(&config, format!("jwtSecret: {JWT_SECRET}\n")).unwrap();
    let output = hookwarden(
        cwd.path(),
        &["token", "--sub", "file", "--role", "ingest", "--config", config.to_str().unwrap()],
        &[],
    );
    let token = the_token(&output);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("config file") && stderr.contains(&config.display().to_string()), "{stderr}");
    assert_eq!(keys.authenticate(Some(&format!("Bearer {token}"))).unwrap().subject, "file");
    assert_eq!(files_in(cwd.path()), vec!["hookwarden.yaml".to_owned()], "token created files");
}

/// A token signed with the test key whose `exp` is `seconds_ago` in the past.
fn expired_token(seconds_ago: u64) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: "late".into(),
        roles: vec!["admin".into()],
        namespaces: vec!["*".into()],
        exp: now - seconds_ago,
        iat: Some(now - 3600),
    };
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}

async fn status_of(server: &Process, token: &str) -> u16 {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/resources/RetryBudget", server.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn a_token_expired_ten_seconds_ago_is_refused_with_the_default_leeway() {
    let db = TestDb::sqlite();
    let server = Process::start(&db, &[]);
    let fresh = common::token("fresh", &[hookwarden::auth::Role::Admin], &["*"]);
    let statuses = (status_of(&server, &expired_token(10)).await, status_of(&server, &fresh).await);
    server.kill();
    assert_eq!(statuses, (401, 200));
}

#[tokio::test]
async fn the_leeway_is_read_from_the_config_file_and_the_environment() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, "auth: {jwtLeeway: 30s}\n").unwrap();
    let server = Process::start(&db, &["--config", config.to_str().unwrap()]);
    let statuses = (status_of(&server, &expired_token(10)).await, status_of(&server, &expired_token(60)).await);
    server.kill();
    assert_eq!(statuses, (200, 401), "a 10 s old token within a 30 s leeway, a 60 s old one past it");

    let mut command = Process::command(&db, &[]);
    command.env("HOOKWARDEN_JWT_LEEWAY", "30s");
    let server = Process::try_start(command).unwrap_or_else(|failed| panic!("{failed}"));
    let status = status_of(&server, &expired_token(10)).await;
    server.kill();
    assert_eq!(status, 200, "within a 30 s leeway");
}

#[test]
fn a_leeway_above_five_minutes_stops_start_up_naming_the_setting() {
    let db = TestDb::sqlite();
    let mut command = Process::command(&db, &[]);
    command.env("HOOKWARDEN_JWT_LEEWAY", "10m");
    let failed = Process::start_must_fail(command, "a 10m leeway must be refused");
    assert_ne!(failed.code, Some(0));
    assert!(failed.stderr.contains("auth.jwtLeeway") && failed.stderr.contains("5m"), "{}", failed.stderr);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, "auth:\n  jwtLeeway: soon\n").unwrap();
    let command = Process::command(&db, &["--config", config.to_str().unwrap()]);
    let failed = Process::start_must_fail(command, "a leeway that is no duration must be refused");
    assert!(failed.stderr.contains("auth.jwtLeeway") && failed.stderr.contains("line 2"), "{}", failed.stderr);
}
