//! What commands print. Every line a command writes goes through [`outln!`] (standard
//! output) or [`errln!`] (standard error).
//!
//! A reader that stops early (`hookwarden get endpoints -o json | head -1`) closes the
//! pipe. Rust ignores `SIGPIPE`, so the next write fails with `BrokenPipe`, and
//! `println!` would panic on it. Here it is [`OutputError::Closed`] instead, which the
//! command returns with `?` and `main` turns into a quiet, successful exit, as `cat` and
//! `grep` end in a pipeline. Standard error has no one to report to: its write errors
//! are dropped.

use std::fmt;
use std::io::{ErrorKind, Write as _};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The reader closed standard output: there is no one left to write for, and that
    /// is not a failure of the command.
    #[error("standard output was closed")]
    Closed,
    #[error("cannot write to standard output: {0}")]
    Write(#[source] std::io::Error),
}

/// Writes to standard output and flushes, so that a closed reader is noticed at this
/// write and not at exit.
pub fn write(args: fmt::Arguments<'_>) -> Result<(), OutputError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.flush()).map_err(|e| match e.kind() {
        ErrorKind::BrokenPipe => OutputError::Closed,
        _ => OutputError::Write(e),
    })
}

/// Writes to standard error; a failure to do so is dropped (there is nowhere to say it).
pub fn write_err(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.flush());
}

/// `println!` that returns `Result<(), OutputError>` instead of panicking (see the module).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns `Result<(), OutputError>` instead of panicking (see the module).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics (see the module).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}
