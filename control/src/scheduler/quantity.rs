//! Exact parsing of Kubernetes resource quantities (`100m`, `1.5`, `128Mi`, `1e3`) into integers.
//!
//! Follows apimachinery's `resource.Quantity`: a decimal number, then a binary SI suffix (`Ki`..`Ei`), a decimal
//! SI suffix (`n`, `u`, `m`, `k`, `M`..`E`) or a decimal exponent (`e3`, `E-2`). Like `MilliValue()`/`Value()`,
//! fractions are rounded up, so `0.1m` of cpu counts as 1 millicore. Decimal arithmetic is done on integers so
//! `0.1` cpu is exactly 100 millicores (floating point would give 100.00000000000001 and round to 101).

use super::SchedulerError;

/// Parses `q` and returns its value scaled by `10^scale`, rounded up (scale 3 = milli-units, 0 = units).
pub(crate) fn parse_scaled(q: &str, scale: u32) -> Result<i64, SchedulerError> {
    let bad = || SchedulerError::InvalidQuantity(q.to_owned());
    let s = q.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(num_end);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(bad());
    }
    if frac_part.contains('.') || frac_part.len() > 30 {
        return Err(bad());
    }
    // The number as an integer `mantissa` divided by 10^frac_digits.
    let mut mantissa: u128 = 0;
    for b in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(b - b'0')))
            .ok_or_else(bad)?;
    }
    // value = mantissa * mul * 10^exp10 with exp10 possibly negative.
    let mut exp10: i32 = -i32::try_from(frac_part.len()).map_err(|_| bad())?;
    let mut mul: u128 = 1;
    match suffix {
        "" => {}
        "Ki" => mul = 1 << 10,
        "Mi" => mul = 1 << 20,
        "Gi" => mul = 1 << 30,
        "Ti" => mul = 1 << 40,
        "Pi" => mul = 1 << 50,
        "Ei" => mul = 1 << 60,
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        _ => {
            let rest = suffix.strip_prefix(['e', 'E']).ok_or_else(bad)?;
            let e: i32 = rest.parse().map_err(|_| bad())?;
            if !(-40..=40).contains(&e) {
                return Err(bad());
            }
            exp10 += e;
        }
    }
    exp10 += i32::try_from(scale).map_err(|_| bad())?;
    let mut value = mantissa.checked_mul(mul).ok_or_else(bad)?;
    if exp10 >= 0 {
        value = value
            .checked_mul(10u128.checked_pow(exp10.unsigned_abs()).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    } else {
        let div = 10u128.checked_pow(exp10.unsigned_abs()).ok_or_else(bad)?;
        value = value.div_ceil(div);
    }
    let value = i64::try_from(value).map_err(|_| bad())?;
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::parse_scaled;

    #[test]
    fn cpu_quantities_become_exact_millicores() {
        assert_eq!(parse_scaled("100m", 3).expect("should succeed"), 100);
        assert_eq!(parse_scaled("0.1", 3).expect("should succeed"), 100);
        assert_eq!(parse_scaled("1.5", 3).expect("should succeed"), 1500);
        assert_eq!(parse_scaled("2", 3).expect("should succeed"), 2000);
        assert_eq!(parse_scaled("1e3", 3).expect("should succeed"), 1_000_000);
        assert_eq!(
            parse_scaled("0.0001", 3).expect("should succeed"),
            1,
            "fractions round up like MilliValue()"
        );
        assert_eq!(parse_scaled("250000u", 3).expect("should succeed"), 250);
    }

    #[test]
    fn memory_quantities_become_bytes() {
        assert_eq!(parse_scaled("128Mi", 0).expect("should succeed"), 128 << 20);
        assert_eq!(parse_scaled("1Gi", 0).expect("should succeed"), 1 << 30);
        assert_eq!(parse_scaled("1.5Gi", 0).expect("should succeed"), 3 << 29);
        assert_eq!(
            parse_scaled("1G", 0).expect("should succeed"),
            1_000_000_000
        );
        assert_eq!(
            parse_scaled("129e6", 0).expect("should succeed"),
            129_000_000
        );
        assert_eq!(parse_scaled("1k", 0).expect("should succeed"), 1000);
        assert_eq!(parse_scaled("1500m", 0).expect("should succeed"), 2);
    }

    #[test]
    fn malformed_quantities_are_rejected() {
        for q in [
            "",
            "abc",
            "1.2.3",
            "12Xi",
            "1e",
            "m",
            "99999999999999999999999Ei",
        ] {
            assert!(parse_scaled(q, 0).is_err(), "{q:?} should be rejected");
        }
    }
}
