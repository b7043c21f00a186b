//! Initialisation helpers: the geometric median (Weiszfeld) and the mean of a sample,
//! used for `b_dec`.

use crate::{Error, Result};

fn check_points(points: &[f32], d: usize) -> Result<usize> {
    if d == 0 || points.is_empty() || !points.len().is_multiple_of(d) {
        return Err(Error::Invalid(format!(
            "need a non-empty [n, d] array of points: got {} values for d = {d}",
            points.len()
        )));
    }
    Ok(points.len() / d)
}

/// The mean of `n` points stored row-major in `points` (`[n, d]`), accumulated in f64.
pub fn mean(points: &[f32], d: usize) -> Result<Vec<f32>> {
    let n = check_points(points, d)?;
    let mut acc = vec![0f64; d];
    for row in points.chunks_exact(d) {
        acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
    }
    Ok(acc.into_iter().map(|a| (a / n as f64) as f32).collect())
}

/// The geometric median of `n` points (`points` row-major `[n, d]`): the `y` minimising
/// `Σ ‖x_i − y‖`, by `iters` Weiszfeld iterations started at the mean
/// (`y ← Σ w_i x_i / Σ w_i`, `w_i = 1 / max(‖x_i − y‖, 1e-8)`; the floor keeps an
/// iterate that lands on a data point finite). Accumulates in f64. This is the `b_dec`
/// initialisation of sparsify and of Bricken et al. (2023).
///
/// ```
/// use sae_ablate::train::geometric_median;
/// // Collinear points: the median is the middle one.
/// let m = geometric_median(&[0.0, 0.0, 1.0, 0.0, 10.0, 0.0], 2, 200)?;
/// assert!((m[0] - 1.0).abs() < 1e-2 && m[1].abs() < 1e-6);
/// # Ok::<(), sae_ablate::Error>(())
/// ```
pub fn geometric_median(points: &[f32], d: usize, iters: usize) -> Result<Vec<f32>> {
    check_points(points, d)?;
    let mut y: Vec<f64> = mean(points, d)?.into_iter().map(f64::from).collect();
    let mut num = vec![0f64; d];
    for _ in 0..iters {
        num.iter_mut().for_each(|v| *v = 0.0);
        let mut den = 0f64;
        for row in points.chunks_exact(d) {
            let dist = row
                .iter()
                .zip(&y)
                .map(|(&x, &m)| (x as f64 - m).powi(2))
                .sum::<f64>()
                .sqrt();
            let w = 1.0 / dist.max(1e-8);
            den += w;
            num.iter_mut()
                .zip(row)
                .for_each(|(a, &x)| *a += w * x as f64);
        }
        if !(den.is_finite() && den > 0.0) {
            break;
        }
        y.iter_mut().zip(&num).for_each(|(m, &a)| *m = a / den);
    }
    Ok(y.into_iter().map(|v| v as f32).collect())
}
