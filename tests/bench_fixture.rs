//! The benchmark fixture does what the benchmarks claim: ~50–100 active latents per token.

use candle_core::{DType, Device, Tensor};
use sae_ablate::bench::{op_edits, random_sae, Op, Path, Prepared};

#[test]
fn random_sae_has_50_to_100_active_latents_per_token() {
    let sae = random_sae(576, 4608, DType::F32, 75.0, 42).unwrap();
    let x = Tensor::randn(0f32, 1.0, (64, 576), &Device::Cpu).unwrap();
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
    assert!("ablate27".parse::<Op>().is_err());
    let e = op_edits(Op::Ablate26, 65536).unwrap();
    assert_eq!(e.latent_edits().len(), 26);
    assert!(e.latent_edits().iter().all(|(i, _)| (*i as usize) < 65536));
    assert_eq!(op_edits(Op::Steer, 4608).unwrap().steers().len(), 1);
}

#[test]
fn fused_and_reference_paths_agree_on_the_fixture() {
    let sae = random_sae(64, 512, DType::BF16, 20.0, 3).unwrap();
    for op in [Op::Encode, Op::Forward, Op::Ablate26, Op::Steer] {
        let p = Prepared::new(&sae, op, 5).unwrap();
        let a = p.run(Path::Fused).unwrap();
        let b = p.run(Path::Reference).unwrap();
        let diff = (a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-2 * (1.0 + scale), "{op:?}: {diff}");
    }
}
