//! `LinkSpec`: one-way delay and rate of an emulated link, e.g. `25ms,100mbit`.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What an emulated link does to each direction independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkSpec {
    /// One-way propagation delay, applied in each direction (RTT = 2 × this).
    pub delay_ms: u64,
    /// Serialisation rate in bits per second, per direction; `None` = unlimited.
    pub rate_bits_per_s: Option<u64>,
}

/// Why a link spec string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseLinkSpecError(String);

impl fmt::Display for ParseLinkSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseLinkSpecError {}

const RATE_UNITS: [(&str, u64); 4] = [
    ("gbit", 1_000_000_000),
    ("mbit", 1_000_000),
    ("kbit", 1_000),
    ("bit", 1),
];

impl LinkSpec {
    /// Parses `DELAY[,RATE]` or `RATE`: delay in `ms` (or `s`), rate in `bit`, `kbit`,
    /// `mbit` or `gbit` per second (decimal units, as in `tc`). Examples: `25ms,100mbit`,
    /// `40ms`, `0ms,10mbit`, `1.5gbit`.
    pub fn parse(s: &str) -> Result<Self, ParseLinkSpecError> {
        let err = |why: String| {
            ParseLinkSpecError(format!(
                "invalid link spec {s:?}: {why} (expected DELAY[,RATE], e.g. \"25ms,100mbit\", \
                 \"40ms\" or \"0ms,10mbit\"; rate units bit, kbit, mbit, gbit)"
            ))
        };
        let mut spec = LinkSpec {
            delay_ms: 0,
            rate_bits_per_s: None,
        };
        let (mut saw_delay, mut saw_rate) = (false, false);
        for part in s.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(err("empty part".into()));
            }
            let split = part
                .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+')))
                .unwrap_or(part.len());
            let (num, unit) = (&part[..split], part[split..].to_ascii_lowercase());
            if let Some((_, mult)) = RATE_UNITS.iter().find(|(u, _)| *u == unit) {
                if saw_rate {
                    return Err(err("more than one rate".into()));
                }
                let v: f64 = num
                    .parse()
                    .map_err(|_| err(format!("rate {part:?} must be a number then {unit}")))?;
                let bits = (v * *mult as f64).round();
                if !bits.is_finite() || bits < 1.0 || bits > u64::MAX as f64 {
                    return Err(err(format!("rate {part:?} must be positive")));
                }
                spec.rate_bits_per_s = Some(bits as u64);
                saw_rate = true;
            } else if unit == "ms" || unit == "s" {
                if saw_delay {
                    return Err(err("more than one delay".into()));
                }
                let v: u64 = num.parse().map_err(|_| {
                    err(format!("delay {part:?} must be a whole number of ms or s"))
                })?;
                spec.delay_ms = if unit == "ms" {
                    v
                } else {
                    v.saturating_mul(1000)
                };
                saw_delay = true;
            } else if unit.is_empty() {
                return Err(err(format!("{part:?} has no unit")));
            } else {
                return Err(err(format!("unknown unit {unit:?} in {part:?}")));
            }
        }
        Ok(spec)
    }

    /// One-way delay.
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms)
    }

    /// Round-trip time a small request/response should see: 2 × delay.
    pub fn rtt(&self) -> Duration {
        2 * self.delay()
    }

    /// Time a bulk transfer of `bytes` in one direction should take: delay + bytes·8/rate.
    pub fn transfer_time(&self, bytes: u64) -> Duration {
        self.delay()
            + self.rate_bits_per_s.map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(bytes as f64 * 8.0 / r as f64)
            })
    }
}

impl FromStr for LinkSpec {
    type Err = ParseLinkSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for LinkSpec {
    /// Canonical form that [`LinkSpec::parse`] reads back, e.g. `25ms,100mbit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.delay_ms)?;
        if let Some(r) = self.rate_bits_per_s {
            let (unit, mult) = RATE_UNITS
                .iter()
                .find(|(_, m)| r % m == 0)
                .expect("bit divides");
            write!(f, ",{}{unit}", r / mult)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let cases = [
            ("25ms,100mbit", 25, Some(100_000_000)),
            ("40ms", 40, None),
            ("0ms,10mbit", 0, Some(10_000_000)),
            ("10mbit", 0, Some(10_000_000)),
            (" 5ms , 64kbit", 5, Some(64_000)),
            ("1s,1gbit", 1000, Some(1_000_000_000)),
            ("1.5Gbit", 0, Some(1_500_000_000)),
        ];
        for (s, d, r) in cases {
            let spec = LinkSpec::parse(s).unwrap();
            assert_eq!((spec.delay_ms, spec.rate_bits_per_s), (d, r), "{s}");
            assert_eq!(LinkSpec::parse(&spec.to_string()).unwrap(), spec);
        }
        assert_eq!(
            LinkSpec::parse("25ms,100mbit").unwrap().to_string(),
            "25ms,100mbit"
        );
        assert_eq!(
            LinkSpec::parse("1.5gbit").unwrap().to_string(),
            "0ms,1500mbit"
        );
    }

    #[test]
    fn errors_are_clear() {
        for (s, needle) in [
            ("25", "\"25\" has no unit"),
            ("", "empty part"),
            ("25ms,", "empty part"),
            ("xms", "unknown unit \"xms\""),
            ("2.5ms", "whole number of ms"),
            ("0mbit", "must be positive"),
            ("1..2mbit", "must be a number then mbit"),
            ("-1mbit", "must be positive"),
            ("1e3mbit", "unknown unit"),
            ("10ms,20ms", "more than one delay"),
            ("1mbit,2mbit", "more than one rate"),
            ("10ms,100mbps", "unknown unit \"mbps\""),
        ] {
            let e = LinkSpec::parse(s).unwrap_err().to_string();
            assert!(e.contains(needle), "{s:?}: {e}");
            assert!(e.contains("e.g. \"25ms,100mbit\""), "{e}");
        }
    }

    #[test]
    fn expected_times() {
        let s = LinkSpec::parse("20ms,20mbit").unwrap();
        assert_eq!(s.rtt(), Duration::from_millis(40));
        assert_eq!(s.transfer_time(2_000_000), Duration::from_millis(820));
    }
}
