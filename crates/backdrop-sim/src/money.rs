//! The simulator's money: the two balances (seedance credits, fal dollars), the price tables,
//! and the ledger of every charge, which tests read to prove no request was paid for twice.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Which wire protocol a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The Seedance REST API (credits).
    Seedance,
    /// The fal.ai queue API (dollars).
    Fal,
}

/// Seedance credits per output image, by model.
pub const SEEDANCE_PRICES: &[(&str, f64)] =
    &[("seedream-v4-5", 8.0), ("seedream-v3", 6.0), ("seedream-5-lite", 7.0), ("seedream-5-edit", 7.0)];

/// The model the seedance edit endpoint (`/v1/seedream/v4.5/edit`) runs.
pub const SEEDANCE_EDIT_MODEL: &str = "seedream-v4-5";

/// fal dollars per output image, by model id.
pub const FAL_PRICES: &[(&str, f64)] = &[
    ("fal-ai/bytedance/seedream/v4.5/edit", 0.04),
    ("fal-ai/bytedance/seedream/v4.5/text-to-image", 0.04),
    ("fal-ai/bytedance/seedream/v4/edit", 0.03),
    ("fal-ai/bytedance/seedream/v4/text-to-image", 0.03),
];

/// The price of one image of `model`, if the simulator knows the model.
#[must_use]
pub fn price(protocol: Protocol, model: &str) -> Option<f64> {
    let table = match protocol {
        Protocol::Seedance => SEEDANCE_PRICES,
        Protocol::Fal => FAL_PRICES,
    };
    table.iter().find(|(m, _)| *m == model).map(|(_, p)| *p)
}

/// One entry of the ledger: a charge at accept time (or a refund, with a negative amount,
/// when a queued fal request is cancelled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The request id handed to the client.
    pub request_id: String,
    /// Hex sha256 of the raw request body: equal bodies mean the same row was sent again.
    pub body_sha256: String,
    /// Credits (seedance) or dollars (fal); negative for a refund.
    pub amount: f64,
    /// Which balance it moved.
    pub protocol: Protocol,
    /// The model that was charged for.
    pub model: String,
    /// Output images paid for.
    pub images: u32,
    /// The seed the request body asked for (`None`: none, or a refund), so a test can tell a
    /// regenerated row from a resubmitted one.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Unix time of the charge, in milliseconds.
    pub at: u64,
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Insufficient {
    pub(crate) required: f64,
    pub(crate) available: f64,
}

/// The balances and the ledger, behind one lock so a check and its charge are atomic.
#[derive(Debug)]
pub(crate) struct Money {
    pub(crate) credits: f64,
    pub(crate) fal_balance: f64,
    pub(crate) ledger: Vec<Charge>,
}

impl Money {
    fn balance_mut(&mut self, protocol: Protocol) -> &mut f64 {
        match protocol {
            Protocol::Seedance => &mut self.credits,
            Protocol::Fal => &mut self.fal_balance,
        }
    }

    /// Charges `amount` if the balance covers it, and records it; otherwise changes nothing.
    pub(crate) fn charge(
        &mut self,
        protocol: Protocol,
        amount: f64,
        mut entry: impl FnMut() -> Charge,
    ) -> Result<f64, Insufficient> {
        let balance = self.balance_mut(protocol);
        // A hair of tolerance so 25 × $0.04 fits in $1.00 despite binary fractions.
        if *balance + 1e-9 < amount {
            return Err(Insufficient { required: amount, available: *balance });
        }
        *balance -= amount;
        let remaining = *balance;
        self.ledger.push(entry());
        Ok(remaining)
    }

    /// Gives `amount` back and records the refund.
    pub(crate) fn refund(&mut self, protocol: Protocol, charge: Charge) {
        *self.balance_mut(protocol) += -charge.amount;
        self.ledger.push(charge);
    }
}

/// The ledger entry of a refund: a negative charge for the same request.
pub(crate) fn refund_entry(request_id: &str, protocol: Protocol, cost: f64, model: String) -> Charge {
    Charge {
        request_id: request_id.to_owned(),
        body_sha256: String::new(),
        amount: -cost,
        protocol,
        model,
        images: 0,
        seed: None,
        at: unix_ms(),
    }
}

/// Unix time now, in milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Charge {
        Charge {
            request_id: "r".into(),
            body_sha256: "h".into(),
            amount: 0.04,
            protocol: Protocol::Fal,
            model: "m".into(),
            images: 1,
            seed: None,
            at: 0,
        }
    }

    #[test]
    fn balance_runs_out_without_partial_charges() {
        let mut money = Money { credits: 10.0, fal_balance: 0.1, ledger: Vec::new() };
        assert_eq!(money.charge(Protocol::Seedance, 8.0, entry), Ok(2.0));
        let refused = money.charge(Protocol::Seedance, 8.0, entry).unwrap_err();
        assert_eq!((refused.required, refused.available), (8.0, 2.0));
        assert_eq!(money.credits, 2.0);
        assert_eq!(money.ledger.len(), 1);
        // Binary fractions: two and a half images' worth must buy exactly two.
        assert!(money.charge(Protocol::Fal, 0.04, entry).is_ok());
        assert!(money.charge(Protocol::Fal, 0.04, entry).is_ok());
        assert!(money.charge(Protocol::Fal, 0.04, entry).is_err());
    }

    #[test]
    fn known_models_have_a_per_image_price_and_unknown_ones_none() {
        assert_eq!(price(Protocol::Seedance, "seedream-v4-5"), Some(8.0));
        assert_eq!(price(Protocol::Seedance, "seedream-v3"), Some(6.0));
        assert_eq!(price(Protocol::Fal, "fal-ai/bytedance/seedream/v4.5/edit"), Some(0.04));
        assert_eq!(price(Protocol::Seedance, "dall-e"), None);
    }
}
