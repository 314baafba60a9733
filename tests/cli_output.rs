//! The CLI's output into a pipe whose reader stops early (`hookwarden … | head -1`): the
//! command ends quietly with exit 0, never with a panic.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{spawn_app, TestApp, TestDb};

/// Runs the binary with `args`, reads `lines` lines of its standard output (none: the
/// reader closes before the command writes), closes the pipe, and returns the exit code
/// and standard error.
fn run_into_closed_pipe(app: Option<&TestApp>, args: &[&str], lines: usize) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookwarden"));
    command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(app) = app {
        command.env("HOOKWARDEN_SERVER", &app.base).env("HOOKWARDEN_TOKEN", &app.admin);
    }
    let mut child = command.spawn().expect("run the CLI");
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..lines {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "{args:?} printed fewer than {lines} lines");
    }
    drop(reader);
    let output = child.wait_with_output().expect("wait for the CLI");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_cut_short_by_its_reader_ends_quietly_and_successfully() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    // Far more than a pipe holds (64 KiB), so that the command is still writing when the
    // reader goes away.
    let note = "x".repeat(512 * 1024);
    app.apply_yaml(&format!(
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: big, annotations: {{note: {note}}}}}\nspec:\n  maxAttempts: 3\n  backoff: {{base: 1s, max: 1m}}\n"
    ))
    .await;
    for args in [
        &["get", "retrybudgets", "-o", "json"][..],
        &["get", "retrybudgets", "-o", "yaml"],
        &["get", "retrybudget", "big", "-o", "json"],
    ] {
        let (code, stderr) = tokio::task::block_in_place(|| run_into_closed_pipe(Some(&app), args, 1));
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
    // The whole output still arrives when it is read to the end.
    let output = Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(["get", "retrybudget", "big", "-o", "json"])
        .env("HOOKWARDEN_SERVER", &app.base)
        .env("HOOKWARDEN_TOKEN", &app.admin)
        .output()
        .unwrap();
    assert!(output.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["metadata"]["annotations"]["note"].as_str().map(str::len), Some(note.len()));
}

#[test]
fn commands_without_a_server_end_quietly_when_no_one_reads() {
    for args in [&["schema"][..], &["token", "--sub", "me", "--role", "admin"], &["--help"]] {
        let home = tempfile::tempdir().unwrap();
        let mut full: Vec<&str> = args.to_vec();
        let data_dir = home.path().to_str().unwrap();
        if args[0] == "token" {
            // `token` signs only with a key that exists (as `serve` leaves it).
            std::fs::write(home.path().join("jwt-secret"), "k".repeat(64)).unwrap();
            full.extend(["--data-dir", data_dir]);
        }
        let (code, stderr) = run_into_closed_pipe(None, &full, 0);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
