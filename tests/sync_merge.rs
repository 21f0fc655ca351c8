//! The merge of a synchronized BatchNorm on its own: the partial statistics
//! `(count, mean, M2)` of any split of some values, merged in rank order,
//! equal the statistics of the whole within 1e-6 relative; through a
//! collective every rank gets the same bits.

use proptest::prelude::*;
use wgpu_batchnorm::Moments;
use wgpu_batchnorm::sync::{self, Collective, InProcessCollective};

/// `(count, mean, M2)` of `v` by a two-pass sum in f64.
fn moments(v: &[f64]) -> Moments {
    let n = v.len() as f64;
    if v.is_empty() {
        return Moments::default();
    }
    let mean = v.iter().sum::<f64>() / n;
    let m2 = v.iter().map(|x| (x - mean) * (x - mean)).sum();
    Moments { n, mean, m2 }
}

/// The parts of `v` cut at `cuts` (sorted, may repeat: empty parts).
fn cut<'a>(v: &'a [f64], cuts: &[usize]) -> Vec<&'a [f64]> {
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().map(|&c| c.min(v.len())));
    bounds.sort_unstable();
    bounds.push(v.len());
    bounds.windows(2).map(|w| &v[w[0]..w[1]]).collect()
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
}

/// Values `mean + spread * u` with `u` in [-1, 1) from the seed.
fn values(len: usize, mean: f64, spread: f64, seed: u64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            mean + spread * u
        })
        .collect()
}

/// Checks the merge of the parts of `v` cut at `cuts` against the whole.
fn check_split(v: &[f64], cuts: &[usize], channels: usize) -> Result<(), TestCaseError> {
    let whole = moments(v);
    let parts = cut(v, cuts);
    // Channel c holds v shifted by c, so that channels differ.
    let per_rank: Vec<Vec<Moments>> = parts
        .iter()
        .map(|p| {
            (0..channels)
                .map(|c| {
                    let m = moments(p);
                    Moments {
                        mean: m.mean + c as f64 * (m.n > 0.0) as u8 as f64,
                        ..m
                    }
                })
                .collect()
        })
        .collect();
    let merged = sync::merge_partials(&per_rank, channels);
    prop_assert_eq!(merged.len(), channels);
    for (c, m) in merged.iter().enumerate() {
        prop_assert_eq!(m.n, whole.n);
        let mean = whole.mean + c as f64;
        prop_assert!(rel(m.mean, mean) <= 1e-6, "mean {} vs {}", m.mean, mean);
        prop_assert!(
            rel(m.var(), whole.var()) <= 1e-6,
            "var {} vs {} (parts {:?})",
            m.var(),
            whole.var(),
            parts.iter().map(|p| p.len()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, rng_seed: proptest::test_runner::RngSeed::Fixed(12), ..ProptestConfig::default() })]

    #[test]
    fn any_split_merges_to_the_whole(
        len in 2usize..400,
        cuts in prop::collection::vec(0usize..400, 0..7),
        log_mean in -3.0f64..6.0,
        log_spread in -2.0f64..2.0,
        negative in any::<bool>(),
        seed in any::<u64>(),
        channels in 1usize..4,
    ) {
        let mean = 10f64.powf(log_mean) * if negative { -1.0 } else { 1.0 };
        let v = values(len, mean, 10f64.powf(log_spread), seed);
        check_split(&v, &cuts, channels)?;
    }

    #[test]
    fn a_huge_mean_with_a_small_spread_merges_to_the_whole(
        len in 2usize..2000,
        cuts in prop::collection::vec(0usize..2000, 1..9),
        seed in any::<u64>(),
    ) {
        let v = values(len, 1e6, 1e-2, seed);
        check_split(&v, &cuts, 2)?;
    }
}

#[test]
fn empty_parts_anywhere_drop_out() {
    let v = values(50, 1e6, 1e-2, 7);
    for cuts in [vec![0, 0], vec![50, 50], vec![10, 10, 10, 50], vec![25]] {
        check_split(&v, &cuts, 3).unwrap();
    }
    // Only empty parts: count 0.
    let none = sync::merge_partials(&vec![vec![Moments::default(); 2]; 3], 2);
    assert!(none.iter().all(|m| m.n == 0.0));
}

#[test]
fn the_order_is_the_rank_order_and_every_rank_gets_the_same_bits() {
    let channels = 3;
    let v = values(700, 1e6, 1e-2, 3);
    let parts = cut(&v, &[100, 100, 350, 600]); // 5 ranks, one empty
    let local: Vec<Vec<Moments>> = parts.iter().map(|p| vec![moments(p); channels]).collect();
    let want = sync::merge_partials(&local, channels);
    let group = InProcessCollective::group(parts.len());
    let got: Vec<Vec<Moments>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| {
                let mine = &local[comm.rank()];
                s.spawn(move || sync::merge_moments(&comm, Some(mine), channels).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, g) in got.iter().enumerate() {
        // Bits, not a tolerance.
        let bits = |m: &[Moments]| -> Vec<[u64; 3]> {
            m.iter()
                .map(|m| [m.n.to_bits(), m.mean.to_bits(), m.m2.to_bits()])
                .collect()
        };
        assert_eq!(bits(g), bits(&want), "rank {r}");
    }
    // The statistics of the whole, within 1e-6.
    let whole = moments(&v);
    assert!(rel(want[0].var(), whole.var()) <= 1e-6);
    assert!(rel(want[0].mean, whole.mean) <= 1e-12);
}

#[test]
fn a_rank_with_inf_gives_pytorch_statistics() {
    let finite = Moments {
        n: 3.0,
        mean: 1.0,
        m2: 2.0,
    };
    let inf = Moments {
        n: 2.0,
        mean: f64::INFINITY,
        m2: f64::NAN,
    };
    let m = sync::merge_partials(&[vec![finite], vec![Moments::default()], vec![inf]], 1);
    assert_eq!((m[0].n, m[0].mean), (5.0, f64::INFINITY));
    assert!(m[0].m2.is_nan());
}
