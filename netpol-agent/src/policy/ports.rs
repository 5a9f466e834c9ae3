//! Port ranges as LPM prefixes: a range `first..=last` becomes the fewest aligned blocks, each
//! a (value, prefix-bits) pair over the 16-bit port.

/// An aligned block of ports: `value` with its low `16 - bits` bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub value: u16,
    pub bits: u8,
}

impl PortPrefix {
    pub fn contains(self, port: u16) -> bool {
        let mask = if self.bits == 0 {
            0
        } else {
            u16::MAX << (16 - u32::from(self.bits))
        };
        port & mask == self.value
    }

    pub fn first(self) -> u16 {
        self.value
    }

    pub fn last(self) -> u16 {
        let span = (1u32 << (16 - u32::from(self.bits))) - 1;
        (u32::from(self.value) + span) as u16
    }
}

/// Decomposes an inclusive range into aligned prefixes (at most 30 for 16 bits).
pub fn prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // Largest block aligned at `start` that stays within `end`.
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << size_log) - 1 > end {
            size_log -= 1;
        }
        out.push(PortPrefix {
            value: start as u16,
            bits: (16 - size_log) as u8,
        });
        start += 1 << size_log;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(
            prefixes(80, 80),
            vec![PortPrefix {
                value: 80,
                bits: 16
            }]
        );
        assert_eq!(prefixes(0, 65535), vec![PortPrefix { value: 0, bits: 0 }]);
        assert_eq!(
            prefixes(32000, 32768),
            vec![
                PortPrefix {
                    value: 32000,
                    bits: 8
                },
                PortPrefix {
                    value: 32256,
                    bits: 7
                },
                PortPrefix {
                    value: 32768,
                    bits: 16
                },
            ]
        );
        assert_eq!(prefixes(1, 65535).len(), 16);
    }

    proptest! {
        #[test]
        fn covers_exactly_the_range(a: u16, b: u16, probe: u16) {
            let (first, last) = (a.min(b), a.max(b));
            let blocks = prefixes(first, last);
            prop_assert!(blocks.len() <= 30);
            let hits = blocks.iter().filter(|p| p.contains(probe)).count();
            let inside = (first..=last).contains(&probe);
            prop_assert_eq!(hits, usize::from(inside), "{:?}", blocks);
            for b in &blocks {
                prop_assert!(b.first() >= first && b.last() <= last);
            }
        }
    }
}
