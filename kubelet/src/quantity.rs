//! Kubernetes resource quantities (`500m`, `128Mi`, `1.5`, `2e3`) as exact integers.
//!
//! Ref: apimachinery `resource.Quantity`: decimal SI suffixes (n u m "" k M G T P E), binary suffixes
//! (Ki Mi Gi Ti Pi Ei) and decimal exponents (`e3`/`E3`). Values are held in nano-units so every valid suffix is
//! exact; `milli_value` and `value` round up as `MilliValue()`/`Value()` do.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A quantity that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {0:?}")]
pub struct QuantityError(pub String);

const NANO: i128 = 1_000_000_000;

/// A parsed quantity in nano-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Amount(i128);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let bad = || QuantityError(text.to_string());
        let s = text.trim();
        if s.is_empty() {
            return Err(bad());
        }
        let (negative, s) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(num_end);
        if number.is_empty() || number == "." {
            return Err(bad());
        }
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        if frac_part.contains('.') {
            return Err(bad());
        }
        // Multiplier as (numerator, power of ten).
        let (mul, exp10): (i128, i32) = match suffix {
            "" => (1, 0),
            "n" => (1, -9),
            "u" => (1, -6),
            "m" => (1, -3),
            "k" => (1, 3),
            "M" => (1, 6),
            "G" => (1, 9),
            "T" => (1, 12),
            "P" => (1, 15),
            "E" => (1, 18),
            "Ki" => (1 << 10, 0),
            "Mi" => (1 << 20, 0),
            "Gi" => (1 << 30, 0),
            "Ti" => (1 << 40, 0),
            "Pi" => (1 << 50, 0),
            "Ei" => (1 << 60, 0),
            e if e.starts_with(['e', 'E']) => (1, e[1..].parse::<i32>().map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        // digits * 10^(exp10 - frac_len + 9) * mul, in nano-units; round up any sub-nano remainder.
        let digits: i128 = format!("{int_part}{frac_part}")
            .parse::<i128>()
            .map_err(|_| bad())?;
        let shift = exp10 - frac_part.len() as i32 + 9;
        let value = if shift >= 0 {
            10i128
                .checked_pow(shift as u32)
                .and_then(|p| digits.checked_mul(p))
                .and_then(|v| v.checked_mul(mul))
                .ok_or_else(bad)?
        } else {
            let div = 10i128.checked_pow((-shift) as u32).ok_or_else(bad)?;
            let n = digits.checked_mul(mul).ok_or_else(bad)?;
            (n + div - 1) / div
        };
        Ok(Amount(if negative { -value } else { value }))
    }

    /// Parses an API quantity, treating an unparsable one as an error.
    pub fn of(q: &Quantity) -> Result<Self, QuantityError> {
        Self::parse(&q.0)
    }

    /// Thousandths, rounded up (`MilliValue`).
    pub fn milli_value(self) -> i64 {
        div_ceil(self.0, NANO / 1000)
    }

    /// Whole units, rounded up (`Value`).
    pub fn value(self) -> i64 {
        div_ceil(self.0, NANO)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn nanos(self) -> i128 {
        self.0
    }
}

impl std::ops::Add for Amount {
    type Output = Amount;
    fn add(self, o: Amount) -> Amount {
        Amount(self.0.saturating_add(o.0))
    }
}

fn div_ceil(n: i128, d: i128) -> i64 {
    let q = if n >= 0 { (n + d - 1) / d } else { n / d };
    q.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_exactly() {
        let cases = [
            ("500m", 500, 1),
            ("1", 1000, 1),
            ("1.5", 1500, 2),
            ("2e3", 2_000_000, 2000),
            ("128Mi", 128 * 1024 * 1024 * 1000, 128 * 1024 * 1024),
            ("1G", 1_000_000_000_000, 1_000_000_000),
            ("100n", 1, 1),
            ("0", 0, 0),
        ];
        for (text, milli, value) in cases {
            let a = Amount::parse(text).unwrap();
            assert_eq!((a.milli_value(), a.value()), (milli, value), "{text}");
        }
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["", "abc", "1.2.3", "5Q", "m", "1e", "--1"] {
            assert!(Amount::parse(bad).is_err(), "{bad}");
        }
    }
}
