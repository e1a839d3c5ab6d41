//! Host ports for tests that make ferry listen (`--expose`, `--expose-base`).
//!
//! A port found free by binding and releasing it can be taken before ferry
//! binds it. Two things make that rare and harmless:
//!
//! - ports come from below the kernel's ephemeral range
//!   (`net.ipv4.ip_local_port_range`, 32768-60999 by default), so the
//!   kernel never hands them out for outgoing connections or `bind(:0)`;
//!   they are picked at random there and checked free on all addresses;
//! - [`retry_on_port_clash`] starts the whole thing again on other ports
//!   when ferry refuses because a port is in use.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::ops::Range;

/// The lowest port handed out.
const LOWEST: u16 = 20_000;

/// How many times [`retry_on_port_clash`] starts again.
const ATTEMPTS: usize = 5;

/// The ports tests pick from: `LOWEST` up to the kernel's ephemeral range,
/// or above it if that range starts too low.
pub fn range() -> Range<u16> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    if low >= LOWEST + 1_000 {
        LOWEST..low
    } else {
        high.saturating_add(1)..u16::MAX
    }
}

fn random() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// The first of `n` consecutive ports that are free on every address now
/// (see the module documentation for why they stay free).
pub fn free_ports(n: u16) -> u16 {
    let range = range();
    let span = (range.end - range.start).saturating_sub(n).max(1);
    for _ in 0..500 {
        let base = range.start + (random() % span as u64) as u16;
        let held: Vec<_> = (0..n)
            .map_while(|i| TcpListener::bind(("0.0.0.0", base + i)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in {range:?}");
}

/// One free port (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// Whether ferry's message `text` says that one of the `n` ports from
/// `base` is in use.
pub fn says_port_in_use(text: &str, base: u16, n: u16) -> bool {
    if !text.contains("in use") {
        return false;
    }
    (base..base.saturating_add(n)).any(|port| {
        let needle = format!(":{port}");
        text.match_indices(&needle).any(|(at, _)| {
            !text[at + needle.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
    })
}

/// Calls `start` with the first of `n` free consecutive ports; when it
/// fails (`Err` with what ferry said) because one of them was taken in the
/// meantime, starts again on other ports. Any other failure panics with
/// its text, as does a clash on every attempt.
pub fn retry_on_port_clash<T>(n: u16, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        let base = free_ports(n);
        match start(base) {
            Ok(v) => return v,
            Err(text) if says_port_in_use(&text, base, n) => {
                eprintln!("a port was taken in between; starting again on others: {text}");
                last = text;
            }
            Err(text) => panic!("{text}"),
        }
    }
    panic!("ports were taken {ATTEMPTS} times in a row; last: {last}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_and_are_free() {
        let r = range();
        for _ in 0..20 {
            let base = free_ports(3);
            assert!(r.contains(&base) && r.contains(&(base + 2)), "{base}");
            for p in base..base + 3 {
                TcpListener::bind(("127.0.0.1", p)).unwrap();
            }
        }
    }

    #[test]
    fn a_clash_is_recognised_by_its_port() {
        let text = "ferry: 127.0.0.1:20001 is already in use";
        assert!(says_port_in_use(text, 20_000, 2));
        assert!(!says_port_in_use(text, 20_000, 1));
        assert!(!says_port_in_use(text, 2_000, 2), "20001 is not :2000x");
        assert!(says_port_in_use(
            "ferry: port 127.0.0.1:21000 (for web-0) is in use",
            21_000,
            3
        ));
        assert!(!says_port_in_use(
            "ferry: 127.0.0.1:21000 refused",
            21_000,
            1
        ));
    }

    #[test]
    fn a_clash_starts_again_on_other_ports_and_other_failures_panic() {
        let mut tries = Vec::new();
        let got = retry_on_port_clash(1, |p| {
            tries.push(p);
            if tries.len() < 3 {
                Err(format!("ferry: 127.0.0.1:{p} is already in use"))
            } else {
                Ok(p)
            }
        });
        assert_eq!(tries.len(), 3);
        assert_eq!(got, tries[2]);
        let other = std::panic::catch_unwind(|| {
            retry_on_port_clash(1, |_| Err::<(), _>("ferry: no such package".into()))
        });
        assert!(other.is_err());
    }
}
