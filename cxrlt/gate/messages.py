"""The input gate's refusals in words, in one place: the service's 422, `cxrlt predict` and the web app all
show these sentences (no imports beyond the standard library, so any caller can use them)."""

from __future__ import annotations

SYNTHETIC_SCOPE = ("This model was trained on SYNTHETIC demo drawings, not on radiographs: a real chest "
                   "radiograph is outside what it has seen, so the gate refuses it even when it is a good "
                   "image. To score real radiographs, train a model on real data (README, \"Real data\": "
                   "CXR-LT labels with MIMIC-CXR-JPG) and serve that model.")


def ood_refusal(score: float, threshold: float, frr: float, synthetic: bool) -> str:
    """Why the out-of-distribution check refused an image. `synthetic`: the model was trained on the
    synthetic demo (its meta says so), and then the advice is to train on real data, not to resend."""
    measured = (f"(OOD score {score:.1f} above the threshold {threshold:.1f}, set so that {frr:.0%} of genuine "
                "images are refused).")
    if synthetic:
        return f"The image is unlike the synthetic images this model was trained on {measured} {SYNTHETIC_SCOPE}"
    return (f"The image does not look like the chest radiographs this model was trained on {measured} "
            "Send a frontal or lateral chest radiograph of an adult.")
