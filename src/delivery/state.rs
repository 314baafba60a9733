//! Where a delivery is in its life, and which states are final. Pure data: the store keeps
//! a delivery's state as its name ([`DeliveryState::as_str`]); the delivery engine and
//! the API decide and show it.

use serde::Serialize;

/// States of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivering,
    Retrying,
    Delivered,
    Failed,
    Dead,
    Held,
    Denied,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 8] = [
        DeliveryState::Pending,
        DeliveryState::Delivering,
        DeliveryState::Retrying,
        DeliveryState::Delivered,
        DeliveryState::Failed,
        DeliveryState::Dead,
        DeliveryState::Held,
        DeliveryState::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivering => "delivering",
            DeliveryState::Retrying => "retrying",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Dead => "dead",
            DeliveryState::Held => "held",
            DeliveryState::Denied => "denied",
        }
    }

    pub fn parse(raw: &str) -> Option<DeliveryState> {
        DeliveryState::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// Final states: nothing more happens unless an operator replays.
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryState::Delivered | DeliveryState::Failed | DeliveryState::Dead | DeliveryState::Denied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_is_read_back_from_its_name_and_four_are_final() {
        for state in DeliveryState::ALL {
            assert_eq!(DeliveryState::parse(state.as_str()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(DeliveryState::parse("unknown"), None);
        let finals: Vec<&str> = DeliveryState::ALL.into_iter().filter(|s| s.is_final()).map(|s| s.as_str()).collect();
        assert_eq!(finals, ["delivered", "failed", "dead", "denied"]);
    }
}
