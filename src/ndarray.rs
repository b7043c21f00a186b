//! `ndarray` in and out (the `ndarray` feature): encode, decode, the reference splice
//! and a fused [`EditPlan`], on `ArrayView2<T>` inputs with `T` = `f32`, `half::f16`
//! or `half::bf16`, returning `Array2<f32>`.
//!
//! Rows are tokens: an activation is `[n, d_in]`, latents are `[n, d_sae]`.
//!
//! **Dtypes.** f16 and bf16 inputs are widened to f32 (exactly: every f16 and bf16 value
//! is an f32) while they are read. That is what the candle paths do with an f16 or bf16
//! tensor anyway ([`Sae::encode`] and the splices run in f32), so the results are the
//! same as passing the array to them as a tensor of its own dtype.
//!
//! **Copies.**
//!
//! | call | input | output |
//! |------|-------|--------|
//! | [`encode`], [`decode`], [`apply_reference`] | one copy into candle's storage | one copy out of candle's storage |
//! | [`apply_plan`], f32 view in standard layout | none: the kernels read the view's slice | none: written into the returned array |
//! | [`apply_plan`], otherwise | one copy (widened and/or gathered to standard layout) | none |
//!
//! "One copy into candle": an f32 view in standard (row-major, contiguous) layout is
//! copied once by `Tensor::from_slice`; any other view (f16/bf16, transposed, sliced
//! with a step) is widened and gathered in one pass into a `Vec<f32>` that candle takes
//! over without copying again. "One copy out": the f32 result is read out of candle's
//! storage into a `Vec` that becomes the `Array2` without another copy. The candle
//! ops in between allocate their own intermediates as they always do. [`apply_plan`]
//! calls the plan's kernels on slices directly, with no tensor at all, so for an f32
//! standard-layout view it copies less than [`EditPlan::apply`] on a tensor does.
//!
//! Errors: a view whose width does not match the SAE is an [`Error`] naming its shape.
//!
//! ```
//! # use candle_core::{DType, Device, Tensor};
//! # use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
//! use ndarray::array;
//! use sae_ablate::edit::{EditPlan, Edits, SpliceMode};
//! # fn main() -> sae_ablate::Result<()> {
//! # let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
//! # let z = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
//! # let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 2),
//! #     SaeWeights::new(eye.clone(), z.clone(), eye, z))?;
//! // `sae`: an identity SAE with d_in = d_sae = 2.
//! let x = array![[3f32, 1.], [-1., 2.]];
//! let f = sae_ablate::ndarray::encode(&sae, x.view())?;
//! assert_eq!(f, array![[3f32, 1.], [0., 2.]]);
//! let plan = EditPlan::new(&sae, &Edits::new(SpliceMode::ErrorPreserving).zero(&[0]))?;
//! let y = sae_ablate::ndarray::apply_plan(&plan, x.view())?;
//! assert_eq!(y, array![[0f32, 1.], [-1., 2.]]);
//! # Ok(()) }
//! ```

use std::borrow::Cow;

use ::ndarray::{Array2, ArrayView2};
use candle_core::{Device, Tensor};
use half::{bf16, f16};

use crate::edit::{reference, EditPlan, Edits};
use crate::sae::Sae;
use crate::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the functions of this module accept: `f32`, `half::f16`, `half::bf16`.
/// Sealed; f16 and bf16 are widened to f32 (exactly) when read.
///
/// ```
/// use sae_ablate::ndarray::Element;
/// assert_eq!(half::bf16::from_f32(1.5).to_f32(), 1.5);
/// assert_eq!(Element::to_f32(2f32), 2.0);
/// ```
pub trait Element: sealed::Sealed + Copy {
    /// The value as f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// A slice of these as f32: borrowed for f32, widened into a new vector otherwise.
    fn f32_slice(s: &[Self]) -> Cow<'_, [f32]>;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn f32_slice(s: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(s)
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn f32_slice(s: &[f16]) -> Cow<'_, [f32]> {
        Cow::Owned(s.iter().map(|v| v.to_f32()).collect())
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn f32_slice(s: &[bf16]) -> Cow<'_, [f32]> {
        Cow::Owned(s.iter().map(|v| v.to_f32()).collect())
    }
}

/// The view's values, row-major f32: borrowed for an f32 view in standard layout,
/// otherwise widened and gathered in one pass.
fn row_major<'a, T: Element>(x: ArrayView2<'a, T>) -> Cow<'a, [f32]> {
    match x.to_slice() {
        Some(s) => T::f32_slice(s),
        None => Cow::Owned(x.iter().map(|v| v.to_f32()).collect()),
    }
}

/// The view as an f32 `[n, d]` candle tensor: exactly one copy.
fn to_tensor<T: Element>(x: &ArrayView2<'_, T>) -> Result<Tensor> {
    let dims = x.dim();
    Ok(match row_major(x.view()) {
        Cow::Borrowed(s) => Tensor::from_slice(s, dims, &Device::Cpu)?,
        Cow::Owned(v) => Tensor::from_vec(v, dims, &Device::Cpu)?,
    })
}

/// An f32 `[n, d]` tensor as an array: one copy out of candle's storage.
fn to_array(t: &Tensor) -> Result<Array2<f32>> {
    let dims = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    from_vec(dims, v)
}

fn from_vec(dims: (usize, usize), v: Vec<f32>) -> Result<Array2<f32>> {
    Array2::from_shape_vec(dims, v)
        .map_err(|e| Error::Invalid(format!("cannot make a {dims:?} array from the result: {e}")))
}

/// Check an activation's width against `d_in`.
fn check_d_in<T>(x: &ArrayView2<'_, T>, d_in: usize) -> Result<()> {
    if x.ncols() == d_in {
        Ok(())
    } else {
        Err(Error::InputDim {
            shape: x.shape().to_vec(),
            d_in,
        })
    }
}

/// Latent activations of `x [n, d_in]`: `[n, d_sae]` f32, the values of [`Sae::encode`].
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
/// use ndarray::array;
/// # fn main() -> sae_ablate::Result<()> {
/// # let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
/// # let z = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
/// # let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 2),
/// #     SaeWeights::new(eye.clone(), z.clone(), eye, z))?;
/// // Identity SAE: f = ReLU(x). A transposed view works too.
/// let x = array![[3f32, -1.], [1., 2.]];
/// let f = sae_ablate::ndarray::encode(&sae, x.t())?;
/// assert_eq!(f, array![[3f32, 1.], [0., 2.]]);
/// let bad = array![[1f32, 2., 3.]];
/// assert!(sae_ablate::ndarray::encode(&sae, bad.view()).unwrap_err().to_string().contains("[1, 3]"));
/// # Ok(()) }
/// ```
pub fn encode<T: Element>(sae: &Sae, x: ArrayView2<'_, T>) -> Result<Array2<f32>> {
    check_d_in(&x, sae.d_in())?;
    if x.nrows() == 0 {
        return Ok(Array2::zeros((0, sae.d_sae())));
    }
    to_array(&sae.encode(&to_tensor(&x)?)?)
}

/// Decode latents `f [n, d_sae]` to `f W_dec + b_dec`: `[n, d_in]` f32, the values of
/// [`Sae::decode`] (a constant normalization is undone, per-token ones are not).
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
/// use half::f16;
/// use ndarray::array;
/// # fn main() -> sae_ablate::Result<()> {
/// # let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
/// # let z = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
/// # let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 2),
/// #     SaeWeights::new(eye.clone(), z.clone(), eye, z))?;
/// let f = array![[f16::from_f32(0.5), f16::from_f32(2.0)]];
/// let y = sae_ablate::ndarray::decode(&sae, f.view())?;
/// assert_eq!(y, array![[0.5f32, 2.0]]);
/// # Ok(()) }
/// ```
pub fn decode<T: Element>(sae: &Sae, f: ArrayView2<'_, T>) -> Result<Array2<f32>> {
    if f.ncols() != sae.d_sae() {
        return Err(Error::Invalid(format!(
            "latents have shape {:?}: the last dimension must equal d_sae = {}",
            f.shape(),
            sae.d_sae()
        )));
    }
    if f.nrows() == 0 {
        return Ok(Array2::zeros((0, sae.d_in())));
    }
    to_array(&sae.decode(&to_tensor(&f)?)?)
}

/// The reference splice ([`reference::apply`]) of `edits` on `x [n, d_in]`:
/// `[n, d_in]` f32.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
/// use ndarray::array;
/// use sae_ablate::edit::{Edits, SpliceMode};
/// # fn main() -> sae_ablate::Result<()> {
/// # let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
/// # let z = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
/// # let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 2),
/// #     SaeWeights::new(eye.clone(), z.clone(), eye, z))?;
/// let edits = Edits::new(SpliceMode::ErrorPreserving).zero(&[1]);
/// let y = sae_ablate::ndarray::apply_reference(&sae, array![[3f32, 1.]].view(), &edits)?;
/// assert_eq!(y, array![[3f32, 0.]]);
/// # Ok(()) }
/// ```
pub fn apply_reference<T: Element>(
    sae: &Sae,
    x: ArrayView2<'_, T>,
    edits: &Edits,
) -> Result<Array2<f32>> {
    check_d_in(&x, sae.d_in())?;
    edits.validate(sae.d_sae())?;
    if x.nrows() == 0 {
        return Ok(Array2::zeros((0, sae.d_in())));
    }
    to_array(&reference::apply(sae, &to_tensor(&x)?, edits)?)
}

/// The fused splice of `plan` on `x [n, d_in]`: `[n, d_in]` f32, the values of
/// [`EditPlan::apply`]. The plan's kernels run on the view's slice directly (no
/// tensor); an f32 view in standard layout is not copied at all.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
/// use ndarray::array;
/// use sae_ablate::edit::{EditPlan, Edits, SpliceMode};
/// # fn main() -> sae_ablate::Result<()> {
/// # let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
/// # let z = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
/// # let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 2),
/// #     SaeWeights::new(eye.clone(), z.clone(), eye, z))?;
/// let plan = EditPlan::new(&sae, &Edits::new(SpliceMode::ErrorPreserving).steer(0, 0.5))?;
/// let x = array![[1f32, 2.], [3., 4.]];
/// let y = sae_ablate::ndarray::apply_plan(&plan, x.view())?;
/// assert_eq!(y, array![[1.5f32, 2.], [3.5, 4.]]);
/// # Ok(()) }
/// ```
pub fn apply_plan<T: Element>(plan: &EditPlan, x: ArrayView2<'_, T>) -> Result<Array2<f32>> {
    check_d_in(&x, plan.d_in())?;
    let dims = x.dim();
    let xs = row_major(x);
    let mut y = vec![0f32; xs.len()];
    plan.run(&xs, &mut y)?;
    from_vec(dims, y)
}
