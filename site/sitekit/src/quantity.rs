//! Resource quantities (`100m`, `1.5`, `128Mi`, `1e3`) as numbers. Pure.
//!
//! Scheduling compares CPU in millicores and everything else in whole units, rounding up like
//! upstream's `MilliValue()` and `Value()`.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of `q` times 1000 (millicores for CPU), rounded up; `None` if it does not parse.
pub fn milli(q: &Quantity) -> Option<i64> {
    parse(&q.0).map(|v| (v * 1000.0).ceil() as i64)
}

/// The value of `q` in whole units (bytes, pods, devices), rounded up.
pub fn units(q: &Quantity) -> Option<i64> {
    parse(&q.0).map(|v| v.ceil() as i64)
}

/// Parses a Kubernetes quantity into a float. Binary suffixes (Ki..Ei), decimal suffixes
/// (n, u, m, k, M, G, T, P, E) and decimal exponents (e3, E-2) are accepted.
pub fn parse(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number == "+" || number == "-" {
        return None;
    }
    let base: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().ok()?;
            10f64.powi(exp)
        }
        _ => return None,
    };
    let value = base * factor;
    value.is_finite().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.to_string())
    }

    #[test]
    fn cpu_in_millicores() {
        assert_eq!(milli(&q("100m")), Some(100));
        assert_eq!(milli(&q("1")), Some(1000));
        assert_eq!(milli(&q("1.5")), Some(1500));
        assert_eq!(milli(&q("0.0001")), Some(1), "rounded up like MilliValue");
        assert_eq!(milli(&q("2e3m")), None, "one suffix only");
    }

    #[test]
    fn memory_in_bytes() {
        assert_eq!(units(&q("128Mi")), Some(128 * 1024 * 1024));
        assert_eq!(units(&q("1G")), Some(1_000_000_000));
        assert_eq!(units(&q("1e3")), Some(1000));
        assert_eq!(units(&q("1.5Gi")), Some(1_610_612_736));
        assert_eq!(units(&q("12k")), Some(12_000));
        assert_eq!(units(&q("110")), Some(110));
        assert_eq!(units(&q("")), None);
        assert_eq!(units(&q("ten")), None);
        assert_eq!(units(&q("1Zi")), None);
    }
}
