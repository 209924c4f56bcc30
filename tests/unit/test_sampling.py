"""Krea 2 schedules equal the reference pipeline's (diffusers Krea2Pipeline + FlowMatchEulerDiscreteScheduler)."""

import numpy as np
import pytest
import torch

from krea2_model import sampling

# diffusers is a pinned test dependency: imported, so a missing one fails the run
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift  # noqa: E402


def reference_sigmas(steps, mu):
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=6400, time_shift_type="exponential")
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sch.sigmas.float()


@pytest.mark.parametrize("w,h", [(1024, 1024), (512, 512), (1280, 768), (2048, 2048), (256, 256)])
def test_raw_mu_matches_pipeline(w, h):
    tokens = (h // 16) * (w // 16)
    assert sampling.mu(w, h, "raw") == pytest.approx(calculate_shift(tokens, 256, 6400, 0.5, 1.15), abs=1e-12)


def test_known_values():
    assert sampling.mu(1024, 1024, "raw") == pytest.approx(0.90625, abs=1e-9)
    assert sampling.mu(1024, 1024, "turbo") == 1.15
    assert sampling.mu(4096, 4096, "raw") > 1.15  # not clamped, like the reference
    with pytest.raises(ValueError, match="raw"):
        sampling.mu(64, 64, "fast")


@pytest.mark.parametrize("steps,variant", [(8, "turbo"), (52, "raw"), (28, "raw"), (1, "turbo"), (50, "raw")])
def test_sigmas_match_scheduler(steps, variant):
    mu = sampling.mu(1024, 1024, variant)
    ours = sampling.sigmas(steps, mu)
    ref = reference_sigmas(steps, mu)
    assert ours.shape == (steps + 1,) and ours[-1] == 0 and ours[0] == pytest.approx(1.0)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (ours - ref).abs().max()
