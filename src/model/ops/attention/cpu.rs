//! Decoding attention's two passes over a row's cache on the CPU with AVX-512, giving the same
//! floats as the plain loops of [`crate::model::cpu`] (which run where these do not apply).
//!
//! - Scores: a key's score is the dot product with the query in sixteen lanes, the lanes then
//!   added one after another. Sixteen keys at a time, their lane sums are transposed in
//!   registers so that the sixteen keys' lanes are added side by side, in the same order: one
//!   vector addition per lane instead of sixteen dependent scalar ones per key.
//! - Values: the output row stays in registers while the weighted values are added into it,
//!   key by key in order, where the plain loop loads and stores it for every key.

/// Writes `scores[j] = dot(q, key(j))` for the first keys in whole blocks of sixteen and returns
/// how many it wrote: 0 without AVX-512 or where E is not a multiple of 16. `dot` is
/// [`crate::model::cpu`]'s: lane i sums q[16c + i] * k[16c + i] over c in order from 0.0, and the
/// lanes are added in order from an empty sum's value, then an empty tail's.
pub(crate) fn block_scores<'a>(scores: &mut [f32], q: &[f32], key: impl Fn(usize) -> &'a [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if q.len().is_multiple_of(16) && !q.is_empty() && crate::model::packed::Kernel::best().is_avx512() {
        let blocks = scores.len() / 16;
        for b in 0..blocks {
            let keys: [&[f32]; 16] = std::array::from_fn(|i| key(b * 16 + i));
            assert!(keys.iter().all(|k| k.len() == q.len()), "keys of another width than the query");
            // Safety: AVX-512F was detected, and every key holds q.len() floats.
            unsafe { x86::scores16(&mut scores[b * 16..b * 16 + 16], q, &keys) };
        }
        return blocks * 16;
    }
    0
}

/// `out += p[j] * value(j)` for every j with p[j] != 0, in order of j, as the plain loop
/// `*o += pj * v` does; returns false (out untouched) where the kernel does not apply: no
/// AVX-512, or E not 64, 128 or 256.
pub(crate) fn add_weighted_values<'a>(out: &mut [f32], p: &[f32], value: impl Fn(usize) -> &'a [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::model::packed::Kernel::best().is_avx512() {
        // Safety (each arm): AVX-512F was detected; the kernel checks every value's length.
        match out.len() {
            64 => unsafe { x86::add_weighted::<4>(out, p, value) },
            128 => unsafe { x86::add_weighted::<8>(out, p, value) },
            256 => unsafe { x86::add_weighted::<16>(out, p, value) },
            _ => return false,
        }
        return true;
    }
    let _ = (out, p, value);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sixteen keys' scores. Safety: AVX-512F, and each key holds q.len() floats, a multiple
    /// of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores16(scores: &mut [f32], q: &[f32], keys: &[&[f32]; 16]) {
        // The lanes of each key: (((0 + q0 k0) + q1 k1) + ...), multiplied then added as the
        // plain loop does (no fused multiply-add).
        let mut lanes = [_mm512_setzero_ps(); 16];
        for (l, k) in lanes.iter_mut().zip(keys) {
            for c in 0..q.len() / 16 {
                let qv = _mm512_loadu_ps(q.as_ptr().add(16 * c));
                let kv = _mm512_loadu_ps(k.as_ptr().add(16 * c));
                *l = _mm512_add_ps(*l, _mm512_mul_ps(qv, kv));
            }
        }
        // columns[i] holds lane i of the sixteen keys.
        let columns = transpose16(lanes);
        let empty: f32 = std::iter::empty::<f32>().sum();
        let mut sum = _mm512_set1_ps(empty);
        for c in columns {
            sum = _mm512_add_ps(sum, c);
        }
        // The plain loop adds its (empty) tail's sum last.
        sum = _mm512_add_ps(sum, _mm512_set1_ps(empty));
        _mm512_storeu_ps(scores.as_mut_ptr(), sum);
    }

    /// The transpose of the 16 x 16 matrix whose rows are `r`: row i of the result is column i.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        // Pairs of rows interleaved by 32 bits within each 128-bit lane.
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Then by 64 bits: u[4i + m] holds, in 128-bit lane L, column 4L + m of rows 4i..4i + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let (a, b) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 1]));
            let (c, d) = (_mm512_castps_pd(t[4 * i + 2]), _mm512_castps_pd(t[4 * i + 3]));
            u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
            u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
        }
        // Then the 128-bit lanes, twice: first within each half of the rows, then across.
        for h in 0..2 {
            for j in 0..4 {
                t[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(u[8 * h + j], u[8 * h + 4 + j]);
                t[8 * h + 4 + j] = _mm512_shuffle_f32x4::<0xdd>(u[8 * h + j], u[8 * h + 4 + j]);
            }
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            out[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
            out[8 + j] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[8 + j]);
        }
        out
    }

    /// [`super::add_weighted_values`] for E = 16 V. Safety: AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_weighted<'a, const V: usize>(out: &mut [f32], p: &[f32], value: impl Fn(usize) -> &'a [f32]) {
        assert_eq!(out.len(), 16 * V);
        let mut acc: [__m512; V] = std::array::from_fn(|i| _mm512_loadu_ps(out.as_ptr().add(16 * i)));
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                let v = value(j);
                assert_eq!(v.len(), 16 * V, "a value of another width than the output");
                let w = _mm512_set1_ps(pj);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(w, _mm512_loadu_ps(v.as_ptr().add(16 * i))));
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::dot;

    /// Keys and values with zeros of both signs, and a query that meets them.
    fn rows(n: usize, e: usize, seed: u32) -> Vec<Vec<f32>> {
        let mut v = crate::testing::uniform(n * e, seed, -2.0, 2.0);
        for (i, x) in v.iter_mut().enumerate() {
            match i % 11 {
                3 => *x = 0.0,
                7 => *x = -0.0,
                _ => {}
            }
        }
        v.chunks(e).map(|r| r.to_vec()).collect()
    }

    #[test]
    fn block_scores_equal_the_plain_dot_products_bit_for_bit() {
        for e in [16, 64, 128, 48] {
            let q = &rows(1, e, 1)[0];
            let mut zero_q = q.clone();
            zero_q.iter_mut().for_each(|x| *x = -0.0);
            let keys = rows(53, e, 2);
            for q in [q, &zero_q] {
                let mut scores = vec![f32::NAN; keys.len()];
                let written = block_scores(&mut scores, q, |j| &keys[j]);
                if crate::model::packed::Kernel::best().is_avx512() {
                    assert_eq!(written, 48);
                }
                for (j, s) in scores.iter().enumerate().take(written) {
                    assert_eq!(s.to_bits(), dot(q, &keys[j]).to_bits(), "key {j} of width {e}");
                }
            }
        }
    }

    #[test]
    fn weighted_values_equal_the_plain_loop_bit_for_bit() {
        for e in [64, 128, 256] {
            let values = rows(37, e, 3);
            let mut p = crate::testing::uniform(values.len(), 4, 0.0, 1.0);
            p[5] = 0.0;
            p[6] = -0.0;
            let start = rows(1, e, 5).pop().unwrap();
            let mut plain = start.clone();
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    for (o, v) in plain.iter_mut().zip(&values[j]) {
                        *o += pj * v;
                    }
                }
            }
            let mut out = start.clone();
            if add_weighted_values(&mut out, &p, |j| &values[j]) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&plain), "width {e}");
            } else {
                assert_eq!(out, start);
            }
        }
    }
}
