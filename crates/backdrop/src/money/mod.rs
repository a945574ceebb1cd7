//! Money, in one place: what each provider charges in ([`Unit`]: seedance credits or fal dollars)
//! and how that converts to dollars, the price of an image ([`PriceTable`], built in and from the
//! config's `[prices]`), the cap a run may spend ([`cap`]) and the runtime gate that holds it
//! ([`Budget`]). Nothing outside this module multiplies by a price or converts a unit.

mod budget;

use std::collections::BTreeMap;

pub use budget::{Budget, Decision, Reservation};

use crate::domain::{DEFAULT_FAL_EDIT_MODEL, DEFAULT_FAL_GENERATE_MODEL, ProviderKind};

/// One credit in dollars (seedance).
pub const DOLLARS_PER_SEEDANCE_CREDIT: f64 = 0.01;

/// Prices per output image in the provider's unit (seedance credits, fal dollars).
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    provider: ProviderKind,
    prices: BTreeMap<String, f64>,
}

impl PriceTable {
    /// The built-in table for `provider`, with the config file's `[prices]` on top.
    #[must_use]
    pub fn new(provider: ProviderKind, overrides: &BTreeMap<String, f64>) -> Self {
        let builtin: &[(&str, f64)] = match provider {
            ProviderKind::Seedance => &[
                ("seedream-v4-5", 8.0),
                ("seedream-v3", 6.0),
                ("seedream-5-lite", 7.0),
                ("seedream-5-edit", 7.0),
            ],
            ProviderKind::Fal => &[
                (DEFAULT_FAL_EDIT_MODEL, 0.04),
                (DEFAULT_FAL_GENERATE_MODEL, 0.04),
                ("fal-ai/bytedance/seedream/v4/edit", 0.03),
                ("fal-ai/bytedance/seedream/v4/text-to-image", 0.03),
                // The short names the fal client maps to those ids (edit and text-to-image cost
                // the same): without them a run naming `seedream-v4-5` would count as free.
                ("seedream-v4-5", 0.04),
                ("seedream-v4.5", 0.04),
                ("seedream-v4", 0.03),
            ],
        };
        let mut prices: BTreeMap<String, f64> = builtin.iter().map(|(m, p)| ((*m).to_owned(), *p)).collect();
        prices.extend(overrides.iter().map(|(m, p)| (m.clone(), *p)));
        Self { provider, prices }
    }

    /// Price of one output image of `model`, in the provider's unit; `None` when unknown.
    #[must_use]
    pub fn unit_price(&self, model: &str) -> Option<f64> {
        self.prices.get(model).copied()
    }

    /// Converts an amount in the provider's unit to dollars (seedance: 1 credit = $0.01).
    #[must_use]
    pub fn to_dollars(&self, amount: f64) -> f64 {
        self.unit().to_dollars(amount)
    }

    /// The unit this table prices in.
    #[must_use]
    pub const fn unit(&self) -> Unit {
        Unit::of(self.provider)
    }
}

/// What a provider charges in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Seedance credits.
    Credits,
    /// US dollars (fal).
    Dollars,
}

impl Unit {
    /// The unit `provider` bills in.
    #[must_use]
    pub const fn of(provider: ProviderKind) -> Self {
        match provider {
            ProviderKind::Seedance => Self::Credits,
            ProviderKind::Fal => Self::Dollars,
        }
    }

    /// `amount` of this unit in dollars (seedance: 1 credit = $0.01).
    #[must_use]
    pub fn to_dollars(self, amount: f64) -> f64 {
        match self {
            Self::Credits => amount * DOLLARS_PER_SEEDANCE_CREDIT,
            Self::Dollars => amount,
        }
    }

    /// `dollars` in this unit.
    #[must_use]
    pub fn from_dollars(self, dollars: f64) -> f64 {
        match self {
            Self::Credits => dollars / DOLLARS_PER_SEEDANCE_CREDIT,
            Self::Dollars => dollars,
        }
    }

    /// An amount for the progress bar and summaries: `96 cr ($0.96)` or `$0.96`.
    #[must_use]
    pub fn show(self, amount: f64) -> String {
        match self {
            Self::Credits => format!("{amount:.0} cr (${:.2})", self.to_dollars(amount)),
            Self::Dollars => format!("${amount:.2}"),
        }
    }
}

/// A charge recorded against `provider` (by its stored name), in dollars; an unknown name is
/// taken as already in dollars.
#[must_use]
pub fn stored_to_dollars(provider: &str, amount: f64) -> f64 {
    provider.parse::<ProviderKind>().map_or(amount, |p| Unit::of(p).to_dollars(amount))
}

/// A money amount backdrop cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MoneyError {
    /// NaN, an infinity or a negative number where an amount of money is expected. NaN is the
    /// dangerous one: every comparison with it is false, so a NaN cap would never refuse a
    /// submit and a NaN price would make every row look free.
    #[error("invalid {name}: {value} is not a finite number ≥ 0")]
    NotAnAmount {
        /// The flag, key or price it came from.
        name: String,
        /// The value given.
        value: f64,
    },
}

impl MoneyError {
    /// A bad amount in the settings never fixes itself.
    #[must_use]
    pub const fn is_retryable(&self) -> bool {
        false
    }
}

/// Checks that `value` (named `name` in the message) is an amount of money: finite and ≥ 0.
///
/// # Errors
/// [`MoneyError::NotAnAmount`] for NaN, ±inf or a negative number.
pub fn amount(name: &str, value: f64) -> Result<f64, MoneyError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(MoneyError::NotAnAmount { name: name.to_owned(), value })
    }
}

/// The cap on what one run may spend, in `provider`'s unit: the tighter of `--max-credits` and
/// `--max-cost` (dollars). On fal, which bills dollars, a credit cap means cents, as on seedance.
///
/// # Errors
/// [`MoneyError::NotAnAmount`] when either limit is NaN, infinite or negative.
pub fn cap(
    provider: ProviderKind,
    max_credits: Option<f64>,
    max_cost: Option<f64>,
) -> Result<Option<f64>, MoneyError> {
    let max_credits = max_credits.map(|c| amount("--max-credits", c)).transpose()?;
    let max_cost = max_cost.map(|c| amount("--max-cost", c)).transpose()?;
    let unit = Unit::of(provider);
    let from_cost = max_cost.map(|usd| unit.from_dollars(usd));
    let from_credits = max_credits.map(|c| unit.from_dollars(Unit::Credits.to_dollars(c)));
    Ok(match (from_cost, from_credits) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

impl PriceTable {
    /// The price of one job of `model` asking for `images` outputs; `None` when the model is
    /// not in the table.
    #[must_use]
    pub fn job_price(&self, model: &str, images: u32) -> Option<f64> {
        self.unit_price(model).map(|p| p * f64::from(images.max(1)))
    }

    /// The price of `images` outputs of `model`; `None` when the model is not in the table.
    #[must_use]
    pub fn images_price(&self, model: &str, images: u64) -> Option<f64> {
        #[expect(clippy::cast_precision_loss, reason = "image counts stay far below 2^52")]
        self.unit_price(model).map(|p| p * images as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn builtin_prices_and_overrides() {
        let none = BTreeMap::new();
        let s = PriceTable::new(ProviderKind::Seedance, &none);
        assert_eq!(s.unit_price("seedream-v4-5"), Some(8.0));
        assert_eq!(s.unit_price("seedream-v3"), Some(6.0));
        assert_eq!(s.unit_price("nope"), None);
        assert!((s.to_dollars(96.0) - 0.96).abs() < 1e-9);
        let f = PriceTable::new(ProviderKind::Fal, &none);
        assert_eq!(f.unit_price(DEFAULT_FAL_EDIT_MODEL), Some(0.04));
        assert_eq!(f.unit_price("fal-ai/bytedance/seedream/v4/text-to-image"), Some(0.03));
        assert!((f.to_dollars(0.5) - 0.5).abs() < 1e-12);
        let over = BTreeMap::from([("seedream-v4-5".to_owned(), 10.0), ("my-model".to_owned(), 3.0)]);
        let s = PriceTable::new(ProviderKind::Seedance, &over);
        assert_eq!(s.unit_price("seedream-v4-5"), Some(10.0));
        assert_eq!(s.unit_price("my-model"), Some(3.0));
        assert_eq!(s.unit_price("seedream-v3"), Some(6.0));
        assert_eq!(s.job_price("seedream-v4-5", 3), Some(30.0));
        assert_eq!(s.images_price("my-model", 4), Some(12.0));
    }

    #[test]
    fn caps_refuse_nan_infinity_and_negative_numbers() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, -0.000_001] {
            for provider in ProviderKind::ALL {
                let err = cap(provider, Some(bad), None).unwrap_err();
                assert!(err.to_string().contains("--max-credits"), "{err}");
                let err = cap(provider, None, Some(bad)).unwrap_err();
                assert!(err.to_string().contains("--max-cost"), "{err}");
                assert!(
                    cap(provider, Some(10.0), Some(bad)).is_err(),
                    "a good credit cap does not hide a bad cost cap"
                );
            }
        }
        assert_eq!(
            cap(ProviderKind::Seedance, Some(0.0), None),
            Ok(Some(0.0)),
            "zero is a cap: spend nothing"
        );
        assert_eq!(amount("x", 0.5), Ok(0.5));
        assert!(amount("[prices] m", f64::NAN).is_err());
    }

    #[test]
    fn caps_take_the_tighter_limit_in_the_providers_unit() {
        let cap = |p, c, d| super::cap(p, c, d).unwrap();
        assert_eq!(cap(ProviderKind::Seedance, Some(80.0), None), Some(80.0));
        assert!((cap(ProviderKind::Seedance, None, Some(0.5)).unwrap_or_default() - 50.0).abs() < 1e-9);
        assert!((cap(ProviderKind::Seedance, Some(80.0), Some(0.5)).unwrap_or_default() - 50.0).abs() < 1e-9);
        assert!((cap(ProviderKind::Fal, Some(80.0), None).unwrap_or_default() - 0.8).abs() < 1e-9);
        assert!((cap(ProviderKind::Fal, Some(80.0), Some(0.5)).unwrap_or_default() - 0.5).abs() < 1e-9);
        assert_eq!(cap(ProviderKind::Fal, None, None), None);
    }

    #[test]
    fn units_convert_both_ways() {
        assert!((Unit::Credits.to_dollars(30.0) - 0.3).abs() < 1e-12);
        assert!((Unit::Credits.from_dollars(0.3) - 30.0).abs() < 1e-9);
        assert!((stored_to_dollars("seedance", 30.0) - 0.3).abs() < 1e-12);
        assert!((stored_to_dollars("fal", 0.03) - 0.03).abs() < 1e-12);
        assert_eq!(Unit::Credits.show(96.0), "96 cr ($0.96)");
    }
}
