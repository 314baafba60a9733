//! The delivery engine: the leased queue's claims, one attempt per claimed delivery
//! (admission, the policy gate, the body and its transform, the signed request, its
//! outcome), retries, ordering and health.

pub mod admission;
mod attempt;
mod decisions;
pub mod dispatch;
pub(crate) mod gate;
pub mod guard;
pub mod http;
pub mod outcome;
pub mod retry;
pub mod signing;
pub mod state;
pub mod transform;
mod upkeep;
pub mod wire;
