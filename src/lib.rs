//! Hookwarden: a declarative webhook control plane.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests drive the same
//! library in-process or the binary as a real process.
#![forbid(unsafe_code)]

pub mod api;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod catalog;
pub mod clock;
pub mod cloudevents;
pub mod config;
pub mod controller;
pub mod delivery;
pub mod duration;
pub mod ids;
pub mod ingest;
pub mod jobs;
pub mod messages;
pub mod operational;
pub mod output;
pub mod policy;
pub mod private_files;
pub mod resources;
pub mod retention;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod threads;
