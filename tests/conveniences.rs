//! The small helpers a first program needs: single-token lookup, log-probabilities, the
//! strongest latents of an encoding, and seeded random latent sets.

#[path = "common/smollm.rs"]
mod smollm;

use candle_core::{Device, Tensor};
use sae_ablate::edit::LatentSet;
use sae_ablate::model;
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};

#[test]
fn single_token_finds_a_word_with_its_space_and_explains_failures() {
    let tok = smollm::tokenizer();
    // Byte-level BPE spells the leading space as `Ġ`.
    assert_eq!(tok.token_to_id(" Paris"), None);
    let paris = tok.single_token(" Paris").unwrap();
    assert_eq!(Some(paris), tok.token_to_id("ĠParis"));
    let err = tok.single_token(" Paris is").unwrap_err().to_string();
    assert!(
        err.contains("2 token(s)") && err.contains("ĠParis") && err.contains("Ġis"),
        "{err}"
    );
    let err = tok.single_token("").unwrap_err().to_string();
    assert!(err.contains("0 token(s)"), "{err}");
    // The input tensor of a forward pass.
    let x = tok
        .encode_tensor("The capital of France is", &Device::Cpu)
        .unwrap();
    assert_eq!(x.dims(), &[1, 5]);
    assert_eq!(
        x.squeeze(0).unwrap().to_vec1::<u32>().unwrap(),
        tok.encode("The capital of France is").unwrap()
    );
}

#[test]
fn token_log_prob_is_the_log_softmax_computed_by_hand() {
    let logits = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 10.]]], &Device::Cpu).unwrap();
    // log softmax(1, 2, 3)[0] = 1 − ln(e + e² + e³).
    let want = 1.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let got = model::token_log_prob(&logits, 0, 0, 0).unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let want = 0.0 - (2.0 + 10f64.exp()).ln();
    let got = model::token_log_prob(&logits, 0, 1, 1).unwrap() as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    let lp = model::log_probs(&logits).unwrap();
    assert_eq!(lp.dims(), &[1, 2, 3]);
    let err = model::token_log_prob(&logits, 0, 0, 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token 3") && err.contains("[1, 2, 3]"),
        "{err}"
    );
    let err = model::token_log_prob(&logits, 1, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1"), "{err}");
}

/// An identity ReLU SAE: the latents are the positive inputs.
fn identity_sae(d: usize) -> Sae {
    let dev = Device::Cpu;
    let eye = Tensor::eye(d, candle_core::DType::F32, &dev).unwrap();
    let z = Tensor::zeros(d, candle_core::DType::F32, &dev).unwrap();
    Sae::new(
        SaeConfig::new(Architecture::Standard, d, d),
        SaeWeights::new(eye.clone(), z.clone(), eye, z),
    )
    .unwrap()
}

#[test]
fn top_latents_lists_the_largest_nonzero_activations_per_token() {
    let sae = identity_sae(5);
    let x = Tensor::new(
        &[
            [[0.5f32, -1., 2., 2., 0.], [0., 0., 0., 0., 0.]],
            [[3., 1., 0., -2., 1.], [0., 0., 0., 0., 7.]],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let top = sae.top_latents(&x, 2).unwrap();
    assert_eq!(
        top,
        vec![
            vec![(2, 2.0), (3, 2.0)], // tie: lower id first
            vec![],                   // nothing fires
            vec![(0, 3.0), (1, 1.0)],
            vec![(4, 7.0)], // fewer than k fire
        ]
    );
    assert_eq!(sae.top_latents(&x, 0).unwrap()[0], vec![]);
}

#[test]
fn latent_sets_active_difference_and_seeded_samples() {
    let f = Tensor::new(&[[0f32, 1., 0., 0.], [0., 0., 0., 2.]], &Device::Cpu).unwrap();
    let active = LatentSet::active(&f).unwrap();
    assert_eq!(active.ids(), &[1, 3]);
    let all = LatentSet::all(6).unwrap();
    assert_eq!(all.difference(&active).ids(), &[0, 2, 4, 5]);
    // Samples are distinct members of the pool, reproducible from the seed.
    let pool = LatentSet::all(1000)
        .unwrap()
        .difference(&LatentSet::new(&[7, 9], 1000).unwrap());
    let a = pool.sample(26, 1).unwrap();
    assert_eq!(a.len(), 26);
    assert!(a.ids().iter().all(|&i| i != 7 && i != 9 && i < 1000));
    assert_eq!(a, pool.sample(26, 1).unwrap());
    assert_ne!(a, pool.sample(26, 2).unwrap());
    let err = active.sample(3, 0).unwrap_err().to_string();
    assert!(err.contains("3") && err.contains("2"), "{err}");
    // Uniform: each of 4 ids is drawn alone about a quarter of the time over 4000 seeds
    // (binomial sd ≈ 27; the bound is 5 sd).
    let four = LatentSet::all(4).unwrap();
    let mut counts = [0usize; 4];
    for seed in 0..4000 {
        counts[four.sample(1, seed).unwrap().ids()[0] as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c.abs_diff(1000) < 137), "{counts:?}");
}
