//! The slot pick against the scan it replaces.

use super::*;

/// The search's ranking as a plain scan: the first valid slot, then each
/// later valid slot with a strictly larger gain.
fn scan(gain: &[f32; SLOTS], valid: &[bool; SLOTS]) -> Option<usize> {
    let mut best: Option<(f32, usize)> = None;
    for c in 0..SLOTS {
        if valid[c] && best.is_none_or(|(g, _)| gain[c] > g) {
            best = Some((gain[c], c));
        }
    }
    best.map(|(_, c)| c)
}

#[test]
fn best_slot_is_the_scan_it_replaces() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    // Few distinct values, so ties are common; NaN, infinities and both
    // zeros among them.
    let values = [
        f32::NAN,
        f32::NEG_INFINITY,
        f32::INFINITY,
        -0.0,
        0.0,
        -1.5,
        0.25,
        0.5,
        3.0,
    ];
    let mut some = 0;
    for case in 0..20_000 {
        let gain: [f32; SLOTS] = std::array::from_fn(|_| values[next() as usize % values.len()]);
        // From all valid to none valid.
        let valid: [bool; SLOTS] = std::array::from_fn(|_| next() % 8 >= case % 9);
        let (got, want) = (best_slot(&gain, &valid), scan(&gain, &valid));
        assert_eq!(got, want, "{gain:?} {valid:?}");
        some += usize::from(want.is_some());
    }
    assert!(some > 10_000 && some < 20_000, "{some}");
}

#[test]
fn max_of_lanes_is_the_largest() {
    let m = [0.5, -2.0, 7.0, 3.0, -0.0, 6.5, 7.0, f32::NEG_INFINITY];
    assert_eq!(max_of_lanes(m), 7.0);
    for i in 0..LANES {
        let mut one = [1.0f32; LANES];
        one[i] = 2.0;
        assert_eq!(max_of_lanes(one), 2.0, "lane {i}");
    }
}
