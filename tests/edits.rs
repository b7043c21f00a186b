//! Latent edits and splice modes: hand-computed values and the defining properties.

#[path = "common/small.rs"]
mod small;

use candle_core::{DType, Device, Tensor};
use sae_ablate::edit::{reference, EditPlan, Edits, LatentEdit, LatentSet, SpliceMode};
use sae_ablate::sae::{Architecture, Normalization};
use small::*;

const EP: SpliceMode = SpliceMode::ErrorPreserving;

fn apply1(edits: Edits) -> Vec<f32> {
    // x = [2,1] through the small standard SAE: f = [1.5, 1.0, 0.25].
    let y = reference::apply(&sae(Architecture::Standard), &t2(&[&[2., 1.]]), &edits).unwrap();
    rows(&y).remove(0)
}

#[test]
fn each_edit_by_hand() {
    // W_dec = [[1,0],[0,2],[1,1]].
    let near = |a: Vec<f32>, b: [f32; 2]| assert_close(&[a], &[b.to_vec()], 1e-6);
    near(apply1(Edits::new(EP)), [2., 1.]);
    // zero latent 1 (f=1): x − 1·[0,2].
    near(apply1(Edits::new(EP).zero(&[1])), [2., -1.]);
    // clamp latent 2 (f=0.25) to 1.25: x + 1·[1,1].
    near(
        apply1(Edits::new(EP).with(2, LatentEdit::Clamp(1.25))),
        [3., 2.],
    );
    // scale latent 0 (f=1.5) by 3: x + 3·[1,0].
    near(
        apply1(Edits::new(EP).with(0, LatentEdit::Scale(3.))),
        [5., 1.],
    );
    // add 1 to latent 0: x + [1,0].
    near(
        apply1(Edits::new(EP).with(0, LatentEdit::Add(1.))),
        [3., 1.],
    );
    // mean-ablate latent 1 to 0.5: x − 0.5·[0,2].
    near(apply1(Edits::new(EP).mean_ablate(&[1], &[0.5])), [2., 0.]);
    // steer by W_dec[1] with c = 0.5: x + [0,1].
    near(apply1(Edits::new(EP).steer(1, 0.5)), [2., 2.]);
    // Reconstruction, zero latent 1: f' = [1.5,0,0.25] -> [1.75, 0.25] + b_dec = [2.25, -0.25].
    let rec = Edits::new(SpliceMode::Reconstruction).zero(&[1]);
    near(apply1(rec), [2.25, -0.25]);
    // Reconstruction with no edit is the SAE's reconstruction.
    near(apply1(Edits::new(SpliceMode::Reconstruction)), [2.25, 1.75]);
}

#[test]
fn error_preserving_without_edits_returns_input() {
    for arch in [
        Architecture::Standard,
        Architecture::JumpRelu,
        Architecture::TopK,
        Architecture::Gated,
    ] {
        let sae = random(arch, 16, 64, DType::F32, 7);
        let x = Tensor::randn(0f32, 1.0, (5, 16), &Device::Cpu).unwrap();
        let y = reference::apply(&sae, &x, &Edits::new(EP)).unwrap();
        assert_close(&rows(&y), &rows(&x), 1e-5);
    }
}

#[test]
fn zero_ablation_subtracts_the_latents_contribution() {
    // y = x − Σ_{i∈S} f_i W_dec[i], for each architecture.
    let s = [1u32, 5, 9, 33, 63];
    for arch in [
        Architecture::Standard,
        Architecture::JumpRelu,
        Architecture::TopK,
        Architecture::Gated,
    ] {
        let sae = random(arch, 16, 64, DType::F32, 11);
        let x = Tensor::randn(0f32, 1.0, (6, 16), &Device::Cpu).unwrap();
        let f = rows(&sae.encode(&x).unwrap());
        let w_dec = rows(&sae.weights().w_dec);
        let mut expect = rows(&x);
        for (r, row) in expect.iter_mut().enumerate() {
            for &i in &s {
                for (j, v) in row.iter_mut().enumerate() {
                    *v -= f[r][i as usize] * w_dec[i as usize][j];
                }
            }
        }
        let y = reference::apply(&sae, &x, &Edits::new(EP).zero(&s)).unwrap();
        assert_close(&rows(&y), &expect, 1e-5);
    }
}

#[test]
fn error_preserving_scales_the_delta_by_the_denormalization() {
    // constant_norm_rescale on the identity SAE: zeroing latent 0 of x = [3,4]
    // removes f_0 · ‖x‖/√2 · W_dec[0] = 0.848528 · 5/√2 · [1,0] = [3, 0].
    let sae = identity(Normalization::ConstantNormRescale);
    let y = reference::apply(&sae, &t2(&[&[3., 4.]]), &Edits::new(EP).zero(&[0])).unwrap();
    assert_close(&rows(&y), &[vec![0., 4.]], 1e-5);
}

#[test]
fn edits_on_inactive_latents_change_nothing() {
    // x = [-1,0]: every latent of the small SAE is inactive.
    let sae = sae(Architecture::Standard);
    let x = t2(&[&[-1., 0.]]);
    let e = Edits::new(EP).zero(&[0, 1]).with(2, LatentEdit::Scale(4.));
    assert_close(
        &rows(&reference::apply(&sae, &x, &e).unwrap()),
        &[vec![-1., 0.]],
        1e-6,
    );
}

#[test]
fn shapes_are_kept_and_empty_batches_work() {
    let sae = sae(Architecture::TopK);
    let x = Tensor::zeros((3, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let e = Edits::new(EP).zero(&[0]);
    assert_eq!(reference::apply(&sae, &x, &e).unwrap().dims(), &[3, 4, 2]);
    let x = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(reference::apply(&sae, &x, &e).unwrap().dims(), &[0, 2]);
}

#[test]
fn bad_edits_are_rejected() {
    // The builder never fails; the checks run once, when the edits meet an SAE.
    let sae3 = sae(Architecture::Standard);
    let x = t2(&[&[1., 1.]]);
    let err = reference::apply(&sae3, &x, &Edits::new(EP).zero(&[1, 1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("latent id 1"), "{err}");
    let twice = Edits::new(EP).steer(2, 1.).steer(2, 3.);
    let err = twice.validate(3).unwrap_err().to_string();
    assert!(err.contains("latent id 2"), "{err}");
    let err = EditPlan::new(&sae3, &twice)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("latent id 2"), "{err}");
    // An edit and a steer of the same latent are allowed.
    assert!(Edits::new(EP).zero(&[2]).steer(2, 1.).validate(3).is_ok());
    let e = Edits::new(EP).zero(&[3]);
    let err = reference::apply(&sae(Architecture::Standard), &t2(&[&[1., 1.]]), &e)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("latent id 3") && err.contains("d_sae = 3"),
        "{err}"
    );
    let err = Edits::new(EP)
        .mean_ablate(&[0, 1], &[0.5])
        .validate(3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 ids but 1 means"), "{err}");
    assert!("sideways".parse::<SpliceMode>().is_err());
    assert_eq!(
        "reconstruct".parse::<SpliceMode>().unwrap(),
        SpliceMode::Reconstruction
    );
}

#[test]
fn latent_sets() {
    let s = LatentSet::new(&[9, 2, 9, 4], 10).unwrap();
    assert_eq!(s.ids(), &[2, 4, 9]);
    assert!(s.contains(4) && !s.contains(5));
    let err = LatentSet::new(&[2, 10], 10).unwrap_err().to_string();
    assert!(err.contains("latent id 10"), "{err}");
}

#[cfg(feature = "esr")]
#[test]
fn the_esr_preset() {
    use sae_ablate::esr::{latent_preset, OTD_LATENTS_LLAMA33_70B_L50};
    let esr = latent_preset("esr26", 65536).unwrap();
    assert_eq!(esr.len(), 26);
    assert_eq!(esr.ids().first(), Some(&3675));
    assert_eq!(esr.ids().last(), Some(&61420));
    // The list as published with the paper's code release, copied independently of the crate.
    let published: [u32; 26] = [
        3675, 7517, 9168, 10304, 11977, 15375, 17481, 17516, 24684, 27331, 28540, 33044, 34002,
        34765, 37536, 40119, 40792, 41038, 45078, 46037, 49897, 54311, 58565, 59483, 61116, 61420,
    ];
    assert_eq!(OTD_LATENTS_LLAMA33_70B_L50, published);
    assert_eq!(esr.ids(), &published);
    // The preset belongs to a 65,536-latent SAE: a smaller one is rejected.
    assert!(latent_preset("esr26", 4608).is_err());
    assert!(latent_preset("nope", 65536).is_err());
}
