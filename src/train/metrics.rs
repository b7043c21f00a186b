//! Reconstruction and sparsity metrics shared by training and evaluation.
//!
//! Definitions (all sums accumulate in f64):
//! * `mse = Σ (x − x̂)² / (N·d)`: mean over tokens *and* dimensions.
//! * `fvu = Σ (x − x̂)² / Σ ‖x_n − μ‖²`, `μ` the mean token of the set: the fraction of
//!   variance unexplained (sparsify's definition; 0 = perfect, 1 = as good as predicting `μ`).
//! * `mean_l0`: the mean number of latents with `f > 0` per token.
//! * `dead_fraction`: the fraction of latents that never fired (`f > 0`) on the set.
//!
//! The functions take a whole set at once; [`MetricsAccumulator`] gives the same numbers
//! batch by batch for data that does not fit in memory.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

fn dims2(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| {
        Error::Invalid(format!(
            "{name} must be a 2-D [tokens, width] tensor, got shape {:?}",
            t.dims()
        ))
    })
}

fn same_shape(x: &Tensor, x_hat: &Tensor) -> Result<(usize, usize)> {
    let s = dims2("x", x)?;
    if x_hat.dims() != x.dims() {
        return Err(Error::Shape {
            name: "x_hat".into(),
            expected: x.dims().to_vec(),
            found: x_hat.dims().to_vec(),
        });
    }
    Ok(s)
}

fn f64_sum(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// Mean squared error per element between `x` and `x_hat` (`[N, d]`, any float dtype).
pub fn mse(x: &Tensor, x_hat: &Tensor) -> Result<f64> {
    let (n, d) = same_shape(x, x_hat)?;
    if n * d == 0 {
        return Err(Error::empty("the token set of mse"));
    }
    let e = (x.to_dtype(DType::F64)? - x_hat.to_dtype(DType::F64)?)?;
    Ok(f64_sum(&e.sqr()?)? / (n * d) as f64)
}

/// Fraction of variance unexplained of `x_hat` as a reconstruction of `x` (`[N, d]`).
/// Errors when the shapes differ or `x` has zero variance (a single token, or all equal).
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> sae_ablate::Result<()> {
/// let x = Tensor::new(&[[1f32, 0.], [3., 0.]], &Device::Cpu)?;
/// // Predicting the mean token [2, 0] explains nothing: FVU = 1.
/// let m = Tensor::new(&[[2f32, 0.], [2., 0.]], &Device::Cpu)?;
/// assert_eq!(sae_ablate::train::fvu(&x, &m)?, 1.0);
/// # Ok(()) }
/// ```
pub fn fvu(x: &Tensor, x_hat: &Tensor) -> Result<f64> {
    same_shape(x, x_hat)?;
    let x64 = x.to_dtype(DType::F64)?;
    let err = f64_sum(&(&x64 - x_hat.to_dtype(DType::F64)?)?.sqr()?)?;
    let var = f64_sum(&x64.broadcast_sub(&x64.mean_keepdim(0)?)?.sqr()?)?;
    ratio(err, var)
}

fn ratio(err: f64, var: f64) -> Result<f64> {
    if var.is_nan() || var <= 0.0 {
        return Err(Error::Invalid(format!(
            "FVU undefined: the inputs have total variance {var}"
        )));
    }
    Ok(err / var)
}

/// Mean number of active (`> 0`) latents per token of `f` (`[N, d_sae]`).
pub fn mean_l0(f: &Tensor) -> Result<f64> {
    let (n, _) = dims2("latents", f)?;
    if n == 0 {
        return Err(Error::empty("the token set of mean L0"));
    }
    let active = f.to_dtype(DType::F32)?.gt(0f64)?.to_dtype(DType::F64)?;
    Ok(f64_sum(&active)? / n as f64)
}

/// Per-latent count of tokens on which it fired (`f > 0`), `[d_sae]` (integer counts stored as f64).
pub fn fire_counts(f: &Tensor) -> Result<Vec<f64>> {
    dims2("latents", f)?;
    Ok(f.to_dtype(DType::F32)?
        .gt(0f64)?
        .to_dtype(DType::F64)?
        .sum(0)?
        .to_vec1::<f64>()?)
}

/// Fraction of latents whose fire count is zero (`counts` as from [`fire_counts`],
/// summed over batches). Errors on an empty slice.
pub fn dead_fraction(counts: &[f64]) -> Result<f64> {
    if counts.is_empty() {
        return Err(Error::empty("the latent set of the dead fraction"));
    }
    Ok(counts.iter().filter(|&&c| c.is_nan() || c <= 0.0).count() as f64 / counts.len() as f64)
}

/// Streaming version of the metrics: feed batches of `(x, x_hat, f)`, read the totals.
/// The FVU's variance uses the mean of *all* tokens seen
/// (`Σ ‖x_n − μ‖² = Σ ‖x_n‖² − N ‖μ‖²`, accumulated in f64), so it equals [`fvu`] on the
/// concatenated set.
#[derive(Debug, Clone)]
pub struct MetricsAccumulator {
    d_in: usize,
    tokens: u64,
    sq_err: f64,
    sq_x: f64,
    sum_x: Vec<f64>,
    active: f64,
    counts: Vec<f64>,
}

impl MetricsAccumulator {
    /// An empty accumulator for inputs of width `d_in` and `d_sae` latents.
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        MetricsAccumulator {
            d_in,
            tokens: 0,
            sq_err: 0.0,
            sq_x: 0.0,
            sum_x: vec![0.0; d_in],
            active: 0.0,
            counts: vec![0.0; d_sae],
        }
    }

    /// Add a batch: inputs `x [N, d_in]`, reconstructions `x_hat [N, d_in]`, latents `f [N, d_sae]`.
    pub fn update(&mut self, x: &Tensor, x_hat: &Tensor, f: &Tensor) -> Result<()> {
        let (n, d) = same_shape(x, x_hat)?;
        if d != self.d_in {
            return Err(Error::InputDim {
                shape: x.dims().to_vec(),
                d_in: self.d_in,
            });
        }
        let (nf, df) = dims2("latents", f)?;
        if nf != n || df != self.counts.len() {
            return Err(Error::Shape {
                name: "latents".into(),
                expected: vec![n, self.counts.len()],
                found: f.dims().to_vec(),
            });
        }
        let x64 = x.to_dtype(DType::F64)?;
        self.sq_err += f64_sum(&(&x64 - x_hat.to_dtype(DType::F64)?)?.sqr()?)?;
        self.sq_x += f64_sum(&x64.sqr()?)?;
        let sx = x64.sum(0)?.to_vec1::<f64>()?;
        self.sum_x.iter_mut().zip(&sx).for_each(|(a, b)| *a += b);
        let c = fire_counts(f)?;
        self.active += c.iter().sum::<f64>();
        self.counts.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
        self.tokens += n as u64;
        Ok(())
    }

    /// Tokens seen.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
    /// Per-element MSE over all tokens seen.
    pub fn mse(&self) -> Result<f64> {
        let m = self.tokens as f64 * self.d_in as f64;
        if m == 0.0 {
            return Err(Error::empty("the token set of mse"));
        }
        Ok(self.sq_err / m)
    }
    /// FVU over all tokens seen.
    pub fn fvu(&self) -> Result<f64> {
        let n = self.tokens as f64;
        let mu2: f64 = if n > 0.0 {
            self.sum_x.iter().map(|s| (s / n) * (s / n)).sum()
        } else {
            0.0
        };
        ratio(self.sq_err, self.sq_x - n * mu2)
    }
    /// Mean L0 over all tokens seen.
    pub fn mean_l0(&self) -> Result<f64> {
        if self.tokens == 0 {
            return Err(Error::empty("the token set of mean L0"));
        }
        Ok(self.active / self.tokens as f64)
    }
    /// Fraction of latents that never fired on the tokens seen.
    pub fn dead_fraction(&self) -> Result<f64> {
        dead_fraction(&self.counts)
    }
    /// Per-latent fire counts (tokens with `f > 0`), e.g. for a density histogram.
    pub fn fire_counts(&self) -> &[f64] {
        &self.counts
    }
}
