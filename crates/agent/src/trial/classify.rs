//! Outcome of one inference against the golden class map and the ground truth.

use proto::wire::Outcome;

/// Mean IoU of `a` against the reference `b`, over the classes present in the
/// reference (a spurious class in `a` lowers the IoU of the classes it took pixels
/// from). `ignore`: a reference label whose pixels are skipped (0 = unlabelled ground
/// truth). An empty reference gives 1.
pub fn mean_iou(a: &[u8], b: &[u8], classes: usize, ignore: Option<u8>) -> f32 {
    let mut inter = [0u32; 256];
    let mut uni = [0u32; 256];
    let mut present = [false; 256];
    for (&x, &y) in a.iter().zip(b) {
        if ignore == Some(y) {
            continue;
        }
        present[y as usize] = true;
        if x == y {
            inter[x as usize] += 1;
            uni[x as usize] += 1;
        } else {
            uni[x as usize] += 1;
            uni[y as usize] += 1;
        }
    }
    let mut sum = 0.0f64;
    let mut n = 0u32;
    for c in 0..classes.min(256) {
        if ignore == Some(c as u8) {
            continue;
        }
        if present[c] {
            sum += f64::from(inter[c]) / f64::from(uni[c]);
            n += 1;
        }
    }
    if n == 0 {
        1.0
    } else {
        (sum / f64::from(n)) as f32
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub mismatched: u32,
    pub iou_vs_golden: f32,
    pub iou_vs_truth: f32,
}

/// The paper's criterion first (any pixel's class differs = failure), then severity.
pub fn classify(
    classes: &[u8],
    golden: &[u8],
    truth: &[u8],
    golden_iou_truth: f32,
    nonfinite: u32,
    num_classes: usize,
    critical_iou: f32,
) -> Verdict {
    let mismatched = classes.iter().zip(golden).filter(|(a, b)| a != b).count() as u32;
    let iou_vs_golden = if mismatched == 0 {
        1.0
    } else {
        mean_iou(classes, golden, num_classes, None)
    };
    let iou_vs_truth = mean_iou(classes, truth, num_classes, Some(0));
    let outcome = if nonfinite > 0 {
        Outcome::NonFinite
    } else if mismatched == 0 {
        Outcome::Masked
    } else if iou_vs_truth > golden_iou_truth {
        Outcome::Improved
    } else if iou_vs_golden <= critical_iou {
        Outcome::SdcCritical
    } else {
        Outcome::SdcTolerable
    };
    Verdict {
        outcome,
        mismatched,
        iou_vs_golden,
        iou_vs_truth,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_basics() {
        assert_eq!(mean_iou(&[1, 1, 2], &[1, 1, 2], 6, None), 1.0);
        // Reference has class 1 only: inter 1, union 2.
        assert!((mean_iou(&[1, 2], &[1, 1], 6, None) - 0.5).abs() < 1e-6);
        // Both classes in the reference: class 1 1/2, class 2 0/1.
        assert!((mean_iou(&[1, 1], &[1, 2], 6, None) - 0.25).abs() < 1e-6);
        // Unlabelled truth pixels are skipped.
        assert_eq!(mean_iou(&[3, 1], &[0, 1], 6, Some(0)), 1.0);
    }

    #[test]
    fn outcomes() {
        let g = vec![1u8; 100];
        let t = vec![1u8; 100];
        let gi = mean_iou(&g, &t, 6, Some(0));
        assert_eq!(classify(&g, &g, &t, gi, 0, 6, 0.5).outcome, Outcome::Masked);
        assert_eq!(
            classify(&g, &g, &t, gi, 3, 6, 0.5).outcome,
            Outcome::NonFinite
        );
        let mut one = g.clone();
        one[0] = 2;
        let v = classify(&one, &g, &t, gi, 0, 6, 0.5);
        assert_eq!(v.mismatched, 1);
        assert_eq!(v.outcome, Outcome::SdcTolerable);
        let half: Vec<u8> = (0..100).map(|i| if i < 60 { 2 } else { 1 }).collect();
        assert_eq!(
            classify(&half, &g, &t, gi, 0, 6, 0.5).outcome,
            Outcome::SdcCritical
        );
        // Golden wrong on a pixel, the faulty run right: improved.
        let mut gw = g.clone();
        gw[5] = 3;
        let giw = mean_iou(&gw, &t, 6, Some(0));
        assert_eq!(
            classify(&g, &gw, &t, giw, 0, 6, 0.5).outcome,
            Outcome::Improved
        );
    }
}
