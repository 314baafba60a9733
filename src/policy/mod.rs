//! The policy engine: CEL expressions compiled once, checked for cost and for the
//! variables they may use, and evaluated within a budget enforced while they run.

pub mod cost;
pub mod decision;
pub mod engine;
pub mod expr;
pub mod gate;
pub mod meter;
pub mod testing;
