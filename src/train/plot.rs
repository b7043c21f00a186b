//! The training-curve PNG: four panels (FVU, L0, dead fraction, learning rate) against
//! training tokens, drawn with the shared plot plumbing (`crate::plot`).

use std::path::Path;

use plotters::prelude::*;

use super::StepLog;
use crate::plot::{write_png, FONT};
use crate::{Error, Result};

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("training-curve plot: {e}"))
}

/// Draw the training curves of `log` into the PNG file `path` (written to a temporary
/// file beside it and renamed). Does nothing useful for an empty log but still writes a
/// valid image.
pub fn plot_training_curves(log: &[StepLog], path: &Path) -> Result<()> {
    write_png(path, |tmp| draw(log, tmp))
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

type Getter = fn(&StepLog) -> f64;

fn draw(log: &[StepLog], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels: [(&str, Getter); 4] = [
        ("FVU", |s| s.fvu),
        ("L0 (active latents / token)", |s| s.l0),
        ("dead fraction", |s| s.dead_fraction),
        ("learning rate", |s| s.lr),
    ];
    let areas = root.split_evenly((2, 2));
    let x_max = log.last().map_or(1.0, |s| s.tokens as f64).max(1.0);
    for (area, (title, get)) in areas.iter().zip(panels) {
        let ys: Vec<(f64, f64)> = log
            .iter()
            .map(|s| (s.tokens as f64, get(s)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        let (mut lo, mut hi) = ys
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, y)| {
                (a.min(y), b.max(y))
            });
        if !(lo.is_finite() && hi.is_finite()) {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 {
            // A flat series: centre it in a visible band.
            let half = if lo.abs() > 1e-12 {
                lo.abs() * 0.1
            } else {
                0.5
            };
            (lo, hi) = (lo - half, hi + half);
        }
        let pad = (hi - lo) * 0.05;
        let mut chart = ChartBuilder::on(area)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, (lo - pad)..(hi + pad))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("tokens")
            .label_style((FONT, 13))
            .x_labels(5)
            .y_labels(5)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(ys, &BLUE))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
