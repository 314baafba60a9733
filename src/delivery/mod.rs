//! The delivery engine: fan-out, the leased queue, signing, retries, ordering and health.

pub mod catalog;
pub mod outcome;
pub mod retry;
pub mod signing;
pub mod worker;
