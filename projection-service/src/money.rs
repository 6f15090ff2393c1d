//! Money in read-model views: per-currency totals (never mixing currencies)
//! and one decimal format for every view.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Money in views: `{"amount":"<decimal string>","currency":"USD"}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MoneyView {
    pub amount: String,
    pub currency: String,
}

/// Sums per currency (sorted by currency code).
#[derive(Default, Debug, Clone)]
pub struct Totals(BTreeMap<String, Decimal>);

impl Totals {
    pub fn add(&mut self, currency: &str, amount: Decimal) {
        *self.0.entry(currency.to_string()).or_default() += amount;
    }

    /// Each currency's sum divided by its count (currencies without a count are left out).
    pub fn averaged_by(&self, counts: &BTreeMap<String, i64>) -> Totals {
        Totals(
            self.0
                .iter()
                .filter_map(|(currency, sum)| {
                    let count = *counts.get(currency)?;
                    (count > 0).then(|| (currency.clone(), *sum / Decimal::from(count)))
                })
                .collect(),
        )
    }

    pub fn views(&self) -> Vec<MoneyView> {
        self.0
            .iter()
            .map(|(currency, amount)| MoneyView {
                amount: format_amount(*amount),
                currency: currency.clone(),
            })
            .collect()
    }
}

impl From<BTreeMap<String, Decimal>> for Totals {
    fn from(sums: BTreeMap<String, Decimal>) -> Self {
        Self(sums)
    }
}

/// At most 4 decimals (the domain's money scale), at least 2.
pub fn format_amount(amount: Decimal) -> String {
    let mut d = amount.round_dp(4).normalize();
    if d.scale() < 2 {
        d.rescale(2);
    }
    d.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_show_two_to_four_decimals() {
        assert_eq!(format_amount(Decimal::new(1, 0)), "1.00");
        assert_eq!(format_amount(Decimal::new(12345, 4)), "1.2345");
        assert_eq!(format_amount(Decimal::new(150, 2)), "1.50");
    }
}
