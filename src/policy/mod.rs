//! The policy engine: CEL expressions compiled once, checked for cost and for the
//! variables they may use.

pub mod engine;
pub mod expr;
pub mod testing;
