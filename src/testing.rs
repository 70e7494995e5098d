//! Deterministic inputs for the tests of kernels, here and in `tests/`: the same values on every
//! machine and in every build.

/// `len` values spread over [lo, hi) by a xorshift generator seeded with `seed`.
pub fn uniform(len: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            lo + (s as f32 / u32::MAX as f32) * (hi - lo)
        })
        .collect()
}
