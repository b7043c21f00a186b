//! The benchmark fixture does what the benchmarks claim: ~50–100 active latents per token.

#[path = "common/checks.rs"]
mod checks;

use candle_core::{DType, Tensor};
use checks::{err_naming, randn};
use sae_ablate::bench::{op_edits, random_sae, Op};
use sae_ablate::edit::{reference, EditPlan};

#[test]
fn random_sae_has_50_to_100_active_latents_per_token() {
    let sae = random_sae(576, 4608, DType::F32, 75.0, 42).unwrap();
    let x = randn(42, 1.0, (64, 576));
    let f = sae.encode(&x).unwrap();
    let l0 = f
        .gt(0f64)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / 64.0;
    assert!((50.0..=100.0).contains(&l0), "mean L0 = {l0}");
}

#[test]
fn ops_parse_and_edit_what_they_say() {
    assert_eq!("ablate26".parse::<Op>().unwrap(), Op::Ablate26);
    err_naming("ablate27".parse::<Op>(), &["ablate27"]);
    let e = op_edits(Op::Ablate26, 65536).unwrap();
    assert_eq!(e.latent_edits().len(), 26);
    assert!(e.latent_edits().iter().all(|(i, _)| (*i as usize) < 65536));
    assert_eq!(op_edits(Op::Steer, 4608).unwrap().steers().len(), 1);
}

/// bf16's unit roundoff (8 significant bits) and f32's.
const U_BF16: f64 = 1.0 / 256.0;
const U_F32: f64 = 1.0 / 16_777_216.0;

fn mat(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_dtype(DType::F64).unwrap();
    match t.rank() {
        1 => vec![t.to_vec1().unwrap()],
        _ => t.to_vec2().unwrap(),
    }
}

/// The fused plan against the reference on the bf16 fixture, per element, for batches
/// on the streaming path (5 tokens: f32 products of the unrounded input) and past the
/// native bf16 GEMM's threshold and the streaming path (40 tokens).
///
/// The bound of each pre-activation `p_ij = b_j + Σ_k x_ik·W_kj` (weights exact in f32):
/// either path's f32 sum of d_in + 1 terms, each product rounded at most once, is within
/// `(d_in + 2)·u_f32·m_ij` of the exact sum, `m_ij = |b_j| + Σ_k |x_ik·W_kj|`; the native
/// bf16 GEMM first rounds `x` to bf16 (`x̃ = x(1 + δ)`, `|δ| ≤ u_bf16`), which moves the
/// exact sum by at most `u_bf16·m_ij`. So `|Δp_ij| ≤ E_ij = (u_bf16·[native] + 2(d_in +
/// 2)·u_f32)·m_ij`, and as ReLU is 1-Lipschitz, `|Δf_ij| ≤ E_ij` too.
///
/// Each output `y_io` of a splice adds, over the latents `J` whose activations enter it
/// (all of them for a reconstruction, the edited ones for an error-preserving ablation,
/// none for steering), `Σ_{j∈J} E_ij·|W_dec[j, o]|`; and rounding: the reference's two
/// decodes of d_sae + 1 terms and its `x + recon_edit − recon`, the plan's shorter sums,
/// at most `3(d_sae + 4)·u_f32·M_io` with `M_io = |x_io| + |b_dec_o| + Σ_j |f_ij·W_dec[j, o]|
/// + |steer_o|`. A factor 1.01 covers the second-order terms.
#[test]
fn fused_and_reference_paths_agree_on_the_fixture() {
    let (d_in, d_sae) = (64usize, 512usize);
    let sae = random_sae(d_in, d_sae, DType::BF16, 20.0, 3).unwrap();
    let w = sae.weights();
    let (w_enc, b_enc, w_dec, b_dec) = (
        mat(&w.w_enc),
        mat(&w.b_enc).remove(0),
        mat(&w.w_dec),
        mat(&w.b_dec).remove(0),
    );
    for (n, native) in [(5usize, false), (40, true)] {
        let x = randn(5 + n as u64, 1.0, (n, d_in));
        let xs = mat(&x);
        let enc_u = if native { U_BF16 } else { 0.0 } + 2.0 * (d_in + 2) as f64 * U_F32;
        let e: Vec<Vec<f64>> = xs
            .iter()
            .map(|xi| {
                (0..d_sae)
                    .map(|j| {
                        let m = b_enc[j].abs()
                            + (0..d_in).map(|k| (xi[k] * w_enc[k][j]).abs()).sum::<f64>();
                        1.01 * enc_u * m
                    })
                    .collect()
            })
            .collect();
        for op in [Op::Encode, Op::Forward, Op::Ablate26, Op::Steer] {
            let edits = op_edits(op, d_sae).unwrap();
            let plan = EditPlan::new(&sae, &edits).unwrap();
            let (got, want) = match op {
                Op::Encode => (plan.encode(&x).unwrap(), sae.encode(&x).unwrap()),
                _ => (
                    plan.apply(&x).unwrap(),
                    reference::apply(&sae, &x, &edits).unwrap(),
                ),
            };
            let (got, want) = (mat(&got), mat(&want));
            let f = mat(&sae.encode(&x).unwrap());
            let enters: Vec<usize> = match op {
                Op::Forward => (0..d_sae).collect(),
                Op::Ablate26 => edits
                    .latent_edits()
                    .iter()
                    .map(|(j, _)| *j as usize)
                    .collect(),
                _ => Vec::new(),
            };
            let mut steer = vec![0f64; d_in];
            for &(s, c) in edits.steers() {
                for (o, v) in steer.iter_mut().enumerate() {
                    *v += c as f64 * w_dec[s as usize][o];
                }
            }
            for i in 0..n {
                for (o, (g, wv)) in got[i].iter().zip(&want[i]).enumerate() {
                    let tol = if op == Op::Encode {
                        e[i][o]
                    } else {
                        let m = xs[i][o].abs()
                            + b_dec[o].abs()
                            + (0..d_sae)
                                .map(|j| (f[i][j] * w_dec[j][o]).abs())
                                .sum::<f64>()
                            + steer[o].abs();
                        let from_f: f64 = enters.iter().map(|&j| e[i][j] * w_dec[j][o].abs()).sum();
                        from_f + 1.01 * 3.0 * (d_sae + 4) as f64 * U_F32 * m
                    };
                    assert!(
                        (g - wv).abs() <= tol,
                        "{op:?} n={n} ({i}, {o}): fused {g} vs reference {wv}, bound {tol}"
                    );
                }
            }
        }
    }
}
