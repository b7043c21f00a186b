//! The `ndarray` entry points against the candle paths they wrap: the same values for
//! f32, f16 and bf16 views, contiguous, transposed and strided, and errors that name
//! the shape.

#[path = "common/small.rs"]
mod small;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use ndarray::{s, Array2, ArrayView2, ShapeBuilder};
use sae_ablate::edit::{reference, EditPlan, Edits, LatentEdit, SpliceMode};
use sae_ablate::ndarray::{apply_plan, apply_reference, decode, encode, Element};
use sae_ablate::sae::{Architecture, Sae};
use small::random;

const D_IN: usize = 16;
const D_SAE: usize = 48;
const ARCHS: [Architecture; 3] = [
    Architecture::Standard,
    Architecture::JumpRelu,
    Architecture::TopK,
];

/// Seeded uniform values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            ((r >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// The same `[n, d]` values in three layouts: standard, the transpose of a
/// `[d, n]` array (column-major), and every other row of a `[2n, d]` array.
struct Layouts<T> {
    standard: Array2<T>,
    fortran: Array2<T>,
    stepped: Array2<T>,
}

impl<T: Element + Default> Layouts<T> {
    fn new(v: &[f32], n: usize, d: usize, cast: fn(f32) -> T) -> Self {
        let standard = Array2::from_shape_fn((n, d), |(i, j)| cast(v[i * d + j]));
        let fortran = Array2::from_shape_fn((n, d).f(), |(i, j)| cast(v[i * d + j]));
        let mut stepped = Array2::from_elem((2 * n, d), T::default());
        stepped.slice_mut(s![..;2, ..]).assign(&standard);
        Layouts {
            standard,
            fortran,
            stepped,
        }
    }

    fn views(&self) -> Vec<(&'static str, ArrayView2<'_, T>)> {
        let fortran = self.fortran.view();
        assert!(!fortran.is_standard_layout());
        let stepped = self.stepped.slice(s![..;2, ..]);
        assert!(!stepped.is_standard_layout());
        vec![
            ("standard", self.standard.view()),
            ("transposed", fortran),
            ("stepped", stepped),
        ]
    }

    /// The values as a standard-layout candle tensor of the element's own dtype.
    fn tensor(&self, dtype: DType) -> Tensor {
        let v: Vec<f32> = self.standard.iter().map(|x| x.to_f32()).collect();
        Tensor::from_vec(v, self.standard.dim(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

fn tensor_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

fn array_rows(a: &Array2<f32>) -> Vec<Vec<f32>> {
    a.rows().into_iter().map(|r| r.to_vec()).collect()
}

/// Equal to the candle result bit for bit: both run the same f32 code on the same
/// (exactly widened) values.
fn same(what: &str, got: &Array2<f32>, want: &Tensor) {
    let (g, w) = (array_rows(got), tensor_rows(want));
    assert_eq!(g.len(), w.len(), "{what}: rows");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: row {i} width");
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x.to_bits() == y.to_bits(),
                "{what}: [{i}][{j}] = {x}, candle gives {y}"
            );
        }
    }
}

fn edit_sets() -> Vec<(&'static str, Edits)> {
    let ep = SpliceMode::ErrorPreserving;
    vec![
        (
            "error-preserving",
            Edits::new(ep)
                .zero(&[1, 5, 9, 30])
                .with(12, LatentEdit::Clamp(1.5))
                .with(40, LatentEdit::Scale(2.0))
                .steer(7, 0.75),
        ),
        (
            "reconstruction",
            Edits::new(SpliceMode::Reconstruction)
                .zero(&[2, 3])
                .with(20, LatentEdit::Add(0.5)),
        ),
    ]
}

/// Every entry point, for one SAE and one element type, over every layout.
fn check_all<T: Element + Default>(sae: &Sae, dtype: DType, cast: fn(f32) -> T, seed: u64) {
    let n = 7;
    let arch = sae.architecture();
    let x = Layouts::new(&values(n * D_IN, seed), n, D_IN, cast);
    let xt = x.tensor(dtype);
    let f_want = sae.encode(&xt).unwrap();
    // Latents in the element type, for decode: the encoded values (sparse) plus noise.
    let f_vals: Vec<f32> = tensor_rows(&f_want)
        .concat()
        .iter()
        .zip(values(n * D_SAE, seed + 1))
        .map(|(f, e)| f + 0.1 * e)
        .collect();
    let f = Layouts::new(&f_vals, n, D_SAE, cast);
    let d_want = sae.decode(&f.tensor(dtype)).unwrap();
    let plans: Vec<_> = edit_sets()
        .into_iter()
        .map(|(name, e)| {
            let plan = EditPlan::new(sae, &e).unwrap();
            let want_ref = reference::apply(sae, &xt, &e).unwrap();
            let want_plan = plan.apply(&xt).unwrap();
            (name, e, plan, want_ref, want_plan)
        })
        .collect();
    for (layout, xv) in x.views() {
        let tag = format!("{arch} {dtype:?} {layout}");
        same(&format!("encode {tag}"), &encode(sae, xv).unwrap(), &f_want);
        for (name, e, plan, want_ref, want_plan) in &plans {
            same(
                &format!("reference {name} {tag}"),
                &apply_reference(sae, xv, e).unwrap(),
                want_ref,
            );
            same(
                &format!("plan {name} {tag}"),
                &apply_plan(plan, xv).unwrap(),
                want_plan,
            );
        }
    }
    for (layout, fv) in f.views() {
        let tag = format!("{arch} {dtype:?} {layout}");
        same(&format!("decode {tag}"), &decode(sae, fv).unwrap(), &d_want);
    }
}

#[test]
fn f32_views_match_the_candle_paths() {
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let sae = random(arch, D_IN, D_SAE, DType::F32, 21 + i as u64);
        check_all(&sae, DType::F32, |v| v, 100 + i as u64);
    }
}

#[test]
fn f16_views_match_the_candle_paths() {
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let sae = random(arch, D_IN, D_SAE, DType::F32, 31 + i as u64);
        check_all(&sae, DType::F16, f16::from_f32, 200 + i as u64);
    }
}

#[test]
fn bf16_views_match_the_candle_paths() {
    for (i, arch) in ARCHS.into_iter().enumerate() {
        // bf16 weights as well: the arrays meet the weights' own dtype.
        let sae = random(arch, D_IN, D_SAE, DType::BF16, 41 + i as u64);
        check_all(&sae, DType::BF16, bf16::from_f32, 300 + i as u64);
    }
}

#[test]
fn reversed_rows_match() {
    // A negative stride: the rows read backwards.
    let sae = random(Architecture::TopK, D_IN, D_SAE, DType::F32, 5);
    let n = 5;
    let x = Array2::from_shape_vec((n, D_IN), values(n * D_IN, 9)).unwrap();
    let rev = x.slice(s![..;-1, ..]);
    assert!(!rev.is_standard_layout());
    let logical: Vec<f32> = rev.iter().copied().collect();
    let t = Tensor::from_vec(logical, (n, D_IN), &Device::Cpu).unwrap();
    same(
        "encode reversed",
        &encode(&sae, rev).unwrap(),
        &sae.encode(&t).unwrap(),
    );
    let (_, e) = edit_sets().remove(0);
    let plan = EditPlan::new(&sae, &e).unwrap();
    same(
        "plan reversed",
        &apply_plan(&plan, rev).unwrap(),
        &plan.apply(&t).unwrap(),
    );
}

#[test]
fn no_rows_give_empty_arrays() {
    let sae = random(Architecture::Standard, D_IN, D_SAE, DType::F32, 3);
    let x = Array2::<f32>::zeros((0, D_IN));
    let (_, e) = edit_sets().remove(0);
    let plan = EditPlan::new(&sae, &e).unwrap();
    assert_eq!(encode(&sae, x.view()).unwrap().dim(), (0, D_SAE));
    assert_eq!(
        decode(&sae, Array2::<f32>::zeros((0, D_SAE)).view())
            .unwrap()
            .dim(),
        (0, D_IN)
    );
    assert_eq!(
        apply_reference(&sae, x.view(), &e).unwrap().dim(),
        (0, D_IN)
    );
    assert_eq!(apply_plan(&plan, x.view()).unwrap().dim(), (0, D_IN));
}

#[test]
fn wrong_widths_are_errors_naming_the_shape() {
    let sae = random(Architecture::JumpRelu, D_IN, D_SAE, DType::F32, 4);
    let (_, e) = edit_sets().remove(0);
    let plan = EditPlan::new(&sae, &e).unwrap();
    let wide = Array2::<f32>::zeros((3, D_IN + 1));
    let narrow_t = Array2::<bf16>::from_elem((D_IN - 1, 2), bf16::ZERO);
    let empty = Array2::<f16>::from_elem((4, 0), f16::ZERO);
    let msg = |r: sae_ablate::Result<Array2<f32>>| r.unwrap_err().to_string();
    let m = msg(encode(&sae, wide.view()));
    assert!(m.contains("[3, 17]") && m.contains("d_in = 16"), "{m}");
    let m = msg(encode(&sae, narrow_t.t()));
    assert!(m.contains("[2, 15]"), "{m}");
    let m = msg(encode(&sae, empty.view()));
    assert!(m.contains("[4, 0]"), "{m}");
    let m = msg(apply_reference(&sae, wide.view(), &e));
    assert!(m.contains("[3, 17]"), "{m}");
    let m = msg(apply_plan(&plan, wide.view()));
    assert!(m.contains("[3, 17]"), "{m}");
    let m = msg(apply_plan(&plan, empty.view()));
    assert!(m.contains("[4, 0]"), "{m}");
    // decode wants d_sae columns: an activation-width array is an error.
    let m = msg(decode(&sae, Array2::<f32>::zeros((2, D_IN)).view()));
    assert!(m.contains("[2, 16]") && m.contains("d_sae = 48"), "{m}");
    // Latent ids out of range are the edits' error, not a panic.
    let far = Edits::new(SpliceMode::ErrorPreserving).zero(&[D_SAE as u32]);
    let m = msg(apply_reference(
        &sae,
        Array2::<f32>::zeros((1, D_IN)).view(),
        &far,
    ));
    assert!(m.contains("48"), "{m}");
}
