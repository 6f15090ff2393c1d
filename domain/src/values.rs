//! Validated value types parsed at the edge (money, currency, email, phone,
//! bounded text, dates, addresses) and the closed vocabularies (enums) of
//! the CRM. Each `parse` returns a message only; callers attach field names.

use crate::error::ValidationErrors;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Max length of names, company, owner, title, industry, website, address lines.
pub const NAME_MAX: usize = 200;
/// Max length of subjects.
pub const SUBJECT_MAX: usize = 500;
/// Max length of reasons, resolutions, outcomes.
pub const REASON_MAX: usize = 1000;
/// Max length of bodies and descriptions.
pub const BODY_MAX: usize = 10_000;

/// Trimmed, non-empty text of at most `max` characters.
pub fn required_text(value: &str, max: usize) -> Result<String, String> {
    let t = value.trim();
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    let n = t.chars().count();
    if n > max {
        return Err(format!("must be at most {max} characters (got {n})"));
    }
    if t.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err("must not contain control characters".into());
    }
    Ok(t.to_string())
}

/// Optional text: absent or blank becomes `None`, otherwise as [`required_text`].
pub fn optional_text(value: Option<&str>, max: usize) -> Result<Option<String>, String> {
    match value {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => required_text(v, max).map(Some),
    }
}

/// Optional value parsed with `parse`; absent or blank becomes `None`.
pub fn optional<T>(
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match value {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => parse(v).map(Some),
    }
}

/// A calendar date `YYYY-MM-DD`.
pub fn parse_date(value: &str) -> Result<NaiveDate, String> {
    let t = value.trim();
    if t.len() != 10 {
        return Err("must be a date YYYY-MM-DD".into());
    }
    NaiveDate::parse_from_str(t, "%Y-%m-%d").map_err(|_| "must be a date YYYY-MM-DD".to_string())
}

/// How far in the future a client-supplied `occurred_at` may lie (clock skew).
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 300;

/// The time a move happened: the client's `occurred_at` (not in the future
/// beyond [`MAX_CLOCK_SKEW_SECONDS`]) or `now`.
pub fn occurred_at(
    value: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    match value {
        None => Ok(now),
        Some(t) if t > now + chrono::Duration::seconds(MAX_CLOCK_SKEW_SECONDS) => {
            Err("must not be in the future".into())
        }
        Some(t) => Ok(t),
    }
}

// ---------------------------------------------------------------- currency

/// Active ISO 4217 currency codes.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XCD", "XCG", "XDR", "XOF", "XPD",
    "XPF", "XPT", "XSU", "XUA", "YER", "ZAR", "ZMW", "ZWG", "ZWL",
];

/// An ISO 4217 currency code (uppercase, from a built-in list of real codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Currency(&'static str);

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Currency::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Currency {
    /// Exact, uppercase ISO code (`"USD"`); lowercase or unknown codes are rejected.
    pub fn parse(value: &str) -> Result<Self, String> {
        let t = value.trim();
        if t.len() != 3 || !t.chars().all(|c| c.is_ascii_uppercase()) {
            return Err("must be an ISO 4217 code of 3 uppercase letters, e.g. USD".into());
        }
        ISO_4217
            .iter()
            .find(|c| **c == t)
            .map(|c| Currency(c))
            .ok_or_else(|| format!("unknown ISO 4217 currency code {t}"))
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }

    pub const USD: Currency = Currency("USD");
    pub const EUR: Currency = Currency("EUR");
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Currency::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> Self {
        c.0.to_string()
    }
}

impl FromStr for Currency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Currency::parse(s)
    }
}

// ------------------------------------------------------------------- money

/// A non-negative amount of money. JSON: `{"amount":"12500.00","currency":"USD"}`
/// (the amount is a decimal string, never a float; its scale is preserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MoneyRepr")]
pub struct Money {
    #[serde(with = "rust_decimal::serde::str")]
    amount: Decimal,
    currency: Currency,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoneyRepr {
    amount: String,
    currency: String,
}

impl TryFrom<MoneyRepr> for Money {
    type Error = String;
    fn try_from(r: MoneyRepr) -> Result<Self, String> {
        let amount = Money::parse_amount(&r.amount).map_err(|e| format!("amount {e}"))?;
        let currency = Currency::parse(&r.currency).map_err(|e| format!("currency {e}"))?;
        Ok(Money { amount, currency })
    }
}

impl Money {
    /// Max number of decimal places.
    pub const MAX_SCALE: u32 = 4;

    pub fn new(amount: Decimal, currency: Currency) -> Result<Self, String> {
        Self::check_amount(amount)?;
        Ok(Self { amount, currency })
    }

    /// Parses `"12500.00 USD"`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut parts = value.split_whitespace();
        let (Some(a), Some(c), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("must be '<amount> <currency>', e.g. '12500.00 USD'".into());
        };
        Ok(Self {
            amount: Self::parse_amount(a)?,
            currency: Currency::parse(c)?,
        })
    }

    /// A plain decimal string: digits, optional `.` and at most 4 decimals,
    /// not negative, below 10^15. No exponents, no signs, no separators.
    pub fn parse_amount(value: &str) -> Result<Decimal, String> {
        let t = value.trim();
        if t.starts_with('-') {
            return Err("must not be negative".into());
        }
        let (int, frac) = match t.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (t, None),
        };
        let digits_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        if !digits_ok(int) || !frac.is_none_or(digits_ok) {
            return Err("must be a decimal string like \"12500.00\"".into());
        }
        if frac.is_some_and(|f| f.len() > Self::MAX_SCALE as usize) {
            return Err(format!(
                "must have at most {} decimal places",
                Self::MAX_SCALE
            ));
        }
        if int.trim_start_matches('0').len() > 15 {
            return Err("must be less than 10^15".into());
        }
        let d = Decimal::from_str(t).map_err(|_| "must be a decimal string".to_string())?;
        Self::check_amount(d)?;
        Ok(d)
    }

    fn check_amount(d: Decimal) -> Result<(), String> {
        if d.is_sign_negative() && !d.is_zero() {
            return Err("must not be negative".into());
        }
        if d.scale() > Self::MAX_SCALE {
            return Err(format!(
                "must have at most {} decimal places",
                Self::MAX_SCALE
            ));
        }
        if d >= Decimal::from(1_000_000_000_000_000_i64) {
            return Err("must be less than 10^15".into());
        }
        Ok(())
    }

    pub fn amount(&self) -> Decimal {
        self.amount
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// Request shape of money: `{"amount":"12500.00","currency":"USD"}`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoneyInput {
    /// Decimal string, e.g. "12500.00".
    pub amount: String,
    /// ISO 4217 code, e.g. "USD".
    pub currency: String,
}

impl MoneyInput {
    /// Validates both parts, recording errors as `<prefix>.amount` and
    /// `<prefix>.currency`.
    pub fn validate(&self, prefix: &str, errs: &mut ValidationErrors) -> Option<Money> {
        let amount = errs.check_opt(
            &format!("{prefix}.amount"),
            Money::parse_amount(&self.amount),
        );
        let currency = errs.check_opt(
            &format!("{prefix}.currency"),
            Currency::parse(&self.currency),
        );
        Some(Money {
            amount: amount?,
            currency: currency?,
        })
    }
}

// ------------------------------------------------------------------- email

/// An email address: trimmed, one `@`, non-empty parts, a dotted domain
/// (stored lowercase), no spaces, at most 254 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    pub fn parse(value: &str) -> Result<Self, String> {
        let t = value.trim();
        if t.is_empty() {
            return Err("must not be empty".into());
        }
        if t.chars().count() > 254 {
            return Err("must be at most 254 characters".into());
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain spaces".into());
        }
        let mut parts = t.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("must contain exactly one '@'".into());
        };
        if local.is_empty() || domain.is_empty() {
            return Err("must have a name before and a domain after '@'".into());
        }
        if local.len() > 64 {
            return Err("must have at most 64 characters before '@'".into());
        }
        if !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
            || domain.starts_with('-')
        {
            return Err("must have a domain like example.com".into());
        }
        if !domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-')
        {
            return Err("domain contains invalid characters".into());
        }
        Ok(Self(format!("{local}@{}", domain.to_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Email {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Email::parse(&s)
    }
}

impl From<Email> for String {
    fn from(e: Email) -> Self {
        e.0
    }
}

// ------------------------------------------------------------------- phone

/// A phone number: digits plus `+ - ( ) .` and spaces (`+` only first),
/// 5 to 20 digits. Stored trimmed as entered.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Phone(String);

impl Phone {
    pub fn parse(value: &str) -> Result<Self, String> {
        let t = value.trim();
        if t.is_empty() {
            return Err("must not be empty".into());
        }
        if t.len() > 40 {
            return Err("must be at most 40 characters".into());
        }
        for (i, c) in t.chars().enumerate() {
            let ok = c.is_ascii_digit()
                || matches!(c, '-' | '(' | ')' | '.' | ' ')
                || (c == '+' && i == 0);
            if !ok {
                return Err(format!(
                    "may contain only digits, spaces and + - ( ) . (found '{c}')"
                ));
            }
        }
        let digits = t.chars().filter(char::is_ascii_digit).count();
        if !(5..=20).contains(&digits) {
            return Err(format!("must have 5 to 20 digits (got {digits})"));
        }
        Ok(Self(t.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Just the digits (with a leading `+` if present), for matching.
    pub fn normalized(&self) -> String {
        let plus = if self.0.starts_with('+') { "+" } else { "" };
        let digits: String = self.0.chars().filter(char::is_ascii_digit).collect();
        format!("{plus}{digits}")
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Phone {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Phone::parse(&s)
    }
}

impl From<Phone> for String {
    fn from(p: Phone) -> Self {
        p.0
    }
}

// ------------------------------------------------------------------- enums

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $s:literal),+ $(,)? } default $default:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[cfg_attr(feature = "openapi", schema(rename_all = "snake_case"))]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name (snake_case).
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $s,)+
                }
            }

            /// Parses the wire name; the error lists the allowed values.
            pub fn parse(value: &str) -> Result<Self, String> {
                match value.trim() {
                    $($s => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown value '{}'; allowed: {}",
                        other,
                        [$($s),+].join(", ")
                    )),
                }
            }

            /// Like `parse` but `None`/blank gives the default value.
            pub fn parse_or_default(value: Option<&str>) -> Result<Self, String> {
                match value {
                    None => Ok($name::$default),
                    Some(v) if v.trim().is_empty() => Ok($name::$default),
                    Some(v) => Self::parse(v),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s)
            }
        }
    };
}

string_enum!(
    /// Channel a lead came in through.
    LeadSource {
        WebForm => "web_form",
        Email => "email",
        Phone => "phone",
        Social => "social",
        Referral => "referral",
        Event => "event",
        Newsletter => "newsletter",
        Import => "import",
        Other => "other",
    } default Other
);

string_enum!(
    /// Relationship of an account to us.
    AccountKind {
        Customer => "customer",
        Prospect => "prospect",
        Partner => "partner",
        Distributor => "distributor",
    } default Customer
);

string_enum!(
    /// Market segment.
    Segment {
        B2b => "b2b",
        B2c => "b2c",
    } default B2b
);

string_enum!(
    /// Kind of activity logged with a contact.
    ActivityKind {
        Call => "call",
        Email => "email",
        Meeting => "meeting",
        Note => "note",
        Task => "task",
    } default Note
);

string_enum!(
    /// Support case priority; drives the SLA deadlines.
    CasePriority {
        Low => "low",
        Normal => "normal",
        High => "high",
        Urgent => "urgent",
    } default Normal
);

string_enum!(
    /// Channel a case came in through.
    CaseChannel {
        Email => "email",
        Phone => "phone",
        Web => "web",
        Chat => "chat",
        Social => "social",
        InPerson => "in_person",
    } default Email
);

string_enum!(
    /// How a contact prefers to be reached.
    ContactChannel {
        Email => "email",
        Phone => "phone",
        Sms => "sms",
        Chat => "chat",
        InPerson => "in_person",
    } default Email
);

// ----------------------------------------------------------------- address

/// A postal address; every part optional, each at most 200 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Address {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

impl Address {
    pub fn is_empty(&self) -> bool {
        *self == Address::default()
    }
}

/// Request shape of an address.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddressInput {
    pub line1: Option<String>,
    pub line2: Option<String>,
    pub city: Option<String>,
    pub region: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

impl AddressInput {
    /// Validates every part, recording errors as `<prefix>.<part>`.
    pub fn validate(&self, prefix: &str, errs: &mut ValidationErrors) -> Address {
        let mut part = |name: &str, v: &Option<String>| {
            errs.check(
                &format!("{prefix}.{name}"),
                optional_text(v.as_deref(), NAME_MAX),
            )
        };
        Address {
            line1: part("line1", &self.line1),
            line2: part("line2", &self.line2),
            city: part("city", &self.city),
            region: part("region", &self.region),
            postal_code: part("postal_code", &self.postal_code),
            country: part("country", &self.country),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn currency_accepts_real_codes_only() {
        assert_eq!(Currency::parse("USD").unwrap().as_str(), "USD");
        assert_eq!(
            Currency::parse("VND").unwrap(),
            Currency::parse(" VND ").unwrap()
        );
        assert!(Currency::parse("usd").is_err());
        assert!(Currency::parse("XYZ").is_err());
        assert!(Currency::parse("US").is_err());
        assert!(Currency::parse("USDD").is_err());
        assert!(serde_json::from_value::<Currency>(json!("ABC")).is_err());
        let mut sorted = ISO_4217.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ISO_4217.len());
    }

    #[test]
    fn money_amount_rules() {
        assert_eq!(
            Money::parse_amount("12500.00").unwrap().to_string(),
            "12500.00"
        );
        assert_eq!(Money::parse_amount("0").unwrap(), Decimal::ZERO);
        assert!(Money::parse_amount("1.2345").is_ok());
        assert!(Money::parse_amount("1.23456").is_err());
        assert!(Money::parse_amount("-1").is_err());
        assert!(Money::parse_amount("1e5").is_err());
        assert!(Money::parse_amount("").is_err());
        assert!(Money::parse_amount("1,000").is_err());
        assert!(Money::parse_amount(".5").is_err());
        assert!(Money::parse_amount("5.").is_err());
        assert!(Money::parse_amount("NaN").is_err());
        assert!(Money::parse_amount("999999999999999.9999").is_ok());
        assert!(Money::parse_amount("1000000000000000").is_err());
        assert!(Money::parse_amount("0001000000000000000").is_err());
        assert!(Money::parse_amount("99999999999999999999999999999999").is_err());
        assert_eq!(Money::parse("10.50 EUR").unwrap().to_string(), "10.50 EUR");
        assert!(Money::parse("10.50").is_err());
    }

    #[test]
    fn money_json_shape_round_trips() {
        let m = Money::new(Decimal::new(1_250_000, 2), Currency::USD).unwrap();
        let v = serde_json::to_value(m).unwrap();
        assert_eq!(v, json!({"amount": "12500.00", "currency": "USD"}));
        let back: Money = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.amount().scale(), 2);
        // floats and invalid values are rejected on the way in
        assert!(
            serde_json::from_value::<Money>(json!({"amount": 1.5, "currency": "USD"})).is_err()
        );
        assert!(
            serde_json::from_value::<Money>(json!({"amount": "-1", "currency": "USD"})).is_err()
        );
        assert!(
            serde_json::from_value::<Money>(json!({"amount": "1", "currency": "usd"})).is_err()
        );
        assert!(Money::new(Decimal::new(-1, 0), Currency::USD).is_err());
        assert!(Money::new(Decimal::new(1, 5), Currency::USD).is_err());
    }

    #[test]
    fn money_input_reports_both_fields() {
        let mut errs = ValidationErrors::new();
        let m = MoneyInput {
            amount: "abc".into(),
            currency: "usd".into(),
        }
        .validate("opportunity.amount", &mut errs);
        assert!(m.is_none());
        assert_eq!(
            errs.fields(),
            vec!["opportunity.amount.amount", "opportunity.amount.currency"]
        );
    }

    #[test]
    fn email_rules() {
        assert_eq!(
            Email::parse("  Jane@ACME.Example ").unwrap().as_str(),
            "Jane@acme.example"
        );
        for bad in [
            "",
            "jane",
            "jane@",
            "@acme.com",
            "jane@acme",
            "a@b@c.com",
            "ja ne@acme.com",
            "jane@.acme.com",
            "jane@acme.com.",
            "jane@acme..com",
            "jane@ac_me.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} should be rejected");
        }
        let long = format!("{}@{}.com", "a".repeat(60), "b".repeat(200));
        assert!(Email::parse(&long).is_err());
        assert!(serde_json::from_value::<Email>(json!("nope")).is_err());
    }

    #[test]
    fn phone_rules() {
        assert_eq!(
            Phone::parse(" +84 28 3822 1234 ").unwrap().as_str(),
            "+84 28 3822 1234"
        );
        assert_eq!(
            Phone::parse("(028) 3822-1234").unwrap().normalized(),
            "02838221234"
        );
        assert!(Phone::parse("1234").is_err());
        assert!(Phone::parse("123456789012345678901").is_err());
        assert!(Phone::parse("12345x").is_err());
        assert!(Phone::parse("12+345678").is_err());
        assert!(Phone::parse("").is_err());
    }

    #[test]
    fn text_and_date_helpers() {
        assert_eq!(required_text("  a  ", 5).unwrap(), "a");
        assert!(required_text("   ", 5).is_err());
        assert!(required_text("abcdef", 5).is_err());
        assert_eq!(required_text("ééééé", 5).unwrap(), "ééééé");
        assert_eq!(optional_text(Some("  "), 5).unwrap(), None);
        assert_eq!(optional_text(None, 5).unwrap(), None);
        assert!(optional_text(Some("abcdef"), 5).is_err());
        assert_eq!(
            parse_date("2026-12-31").unwrap(),
            NaiveDate::from_ymd_opt(2026, 12, 31).unwrap()
        );
        assert!(parse_date("2026-02-30").is_err());
        assert!(parse_date("31/12/2026").is_err());
        assert!(parse_date("2026-1-5").is_err());
    }

    #[test]
    fn enums_parse_snake_case_and_list_allowed_values() {
        assert_eq!(LeadSource::parse("web_form"), Ok(LeadSource::WebForm));
        assert_eq!(CaseChannel::parse("in_person"), Ok(CaseChannel::InPerson));
        let err = AccountKind::parse("vendor").unwrap_err();
        assert!(
            err.contains("customer, prospect, partner, distributor"),
            "{err}"
        );
        assert_eq!(
            CasePriority::parse_or_default(None),
            Ok(CasePriority::Normal)
        );
        assert_eq!(
            CaseChannel::parse_or_default(Some("")),
            Ok(CaseChannel::Email)
        );
        assert_eq!(serde_json::to_value(Segment::B2b).unwrap(), json!("b2b"));
        for k in ActivityKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
        for k in LeadSource::ALL {
            assert_eq!(LeadSource::parse(k.as_str()), Ok(*k));
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
    }

    #[test]
    fn address_input_reports_nested_paths() {
        let mut errs = ValidationErrors::new();
        let a = AddressInput {
            city: Some("x".repeat(201)),
            country: Some(" VN ".into()),
            ..Default::default()
        }
        .validate("address", &mut errs);
        assert_eq!(errs.fields(), vec!["address.city"]);
        assert_eq!(a.country.as_deref(), Some("VN"));
    }
}
