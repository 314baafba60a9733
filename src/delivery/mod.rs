//! The delivery engine: fan-out, the leased queue, signing, retries, ordering and health.

pub mod admission;
pub mod guard;
pub mod outcome;
pub mod retry;
pub mod signing;
pub mod state;
pub mod worker;
