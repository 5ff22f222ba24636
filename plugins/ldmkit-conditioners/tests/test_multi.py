"""conditioner=multi: parts merged by role, each part's own null condition and dropout."""

import pytest
import torch

from ldmkit.config import ConfigError, compose_config
from ldmkit.pipeline import build_pipeline
from ldmkit.testing import ConditionerConformance
from ldmkit_conditioners import ClassLabelConditioner, MultiConditioner, SemanticMapConditioner
from ldmkit_conditioners.multi import merge

PARTS = [
    {"name": "class_label", "num_classes": 5, "embed_dim": 8, "drop_rate": 0.5},
    {"name": "class_label", "num_classes": 5, "embed_dim": 8, "input_key": "style", "drop_rate": 0.0},
    {"name": "class_label", "num_classes": 5, "role": "vector", "drop_rate": 0.2},
    {"name": "semantic_map", "num_classes": 4, "n_stages": 0},
]


def batch(n=4):
    return {
        "label": torch.arange(n) % 5,
        "style": (torch.arange(n) + 2) % 5,
        "segmentation": (torch.arange(n * 16).reshape(n, 4, 4) + torch.arange(n)[:, None, None]) % 4,
    }


class TestMultiConformance(ConditionerConformance):
    def make_conditioner(self):
        # the parts' own dropout off: the mixin drives dropout through the composite's drop_rate
        return MultiConditioner(parts=[{**p, "drop_rate": 0.0} for p in PARTS])

    def make_batch(self, n):
        return batch(n)


def test_roles_concatenate_in_part_order_with_declared_dims():
    c = MultiConditioner(parts=PARTS)
    b = batch()
    out = c(b)
    first, second, third, fourth = (p(b) for p in c.parts)
    torch.testing.assert_close(out["crossattn"], torch.cat([first["crossattn"], second["crossattn"]], 1))
    torch.testing.assert_close(out["vector"], third["vector"])
    torch.testing.assert_close(out["concat"], fourth["concat"])
    assert out["crossattn"].shape == (4, 2, 8) and c.crossattn_dim == 8
    assert c.vector_dim == 5 and c.concat_channels == 4
    assert c.input_keys == ("label", "style", "segmentation")
    assert c.input_kind("segmentation") == "segmentation" and c.input_kind("label") == "class"
    assert c.output_dims() == {"crossattn": 8, "concat": 4, "vector": 5}


def test_null_condition_is_the_null_of_the_parts_that_drop_and_the_condition_of_the_others():
    """The label (0.5) and the vector (0.2) drop, the style (0) never does: guidance nulls
    the first two and keeps the style, the null training shows (as Stable Diffusion's
    inpainting keeps the masked image and nulls the text)."""
    c = MultiConditioner(parts=PARTS)
    b = batch()
    uncond = c.unconditional(b)
    nulls = [p.unconditional(b) for p in c.parts]
    style = c.parts[1](b)
    torch.testing.assert_close(uncond["crossattn"], torch.cat([nulls[0]["crossattn"], style["crossattn"]], 1))
    torch.testing.assert_close(uncond["vector"], nulls[2]["vector"])
    c.drop_rate = 0.1  # a joint drop trains every part's null at once: that is the null
    torch.testing.assert_close(c.unconditional(b)["crossattn"],
                               torch.cat([nulls[0]["crossattn"], nulls[1]["crossattn"]], 1))  # fmt: skip


def test_dropout_is_per_part_and_per_sample():
    c = MultiConditioner(parts=PARTS).eval()
    n = 4000
    b = {"label": torch.zeros(n, dtype=torch.long), "style": torch.ones(n, dtype=torch.long),
         "segmentation": torch.zeros(n, 4, 4, dtype=torch.long)}
    cond, uncond = c(b), merge([p.unconditional(b) for p in c.parts])  # each part's own null
    out = c.condition(b, generator=torch.Generator().manual_seed(0))

    def dropped(role, sl):
        real = (out[role][:, sl] == cond[role][:, sl]).flatten(1).all(1)
        null = (out[role][:, sl] == uncond[role][:, sl]).flatten(1).all(1)
        assert bool((real ^ null).all()), f"{role}[{sl}] is neither the real nor the null condition"
        return null

    label = dropped("crossattn", slice(0, 1))
    style = dropped("crossattn", slice(1, 2))
    vector = dropped("vector", slice(None))
    segmentation = dropped("concat", slice(None))
    assert 0.45 < label.float().mean() < 0.55      # part 0: drop_rate 0.5
    assert not style.any()                          # part 1: drop_rate 0
    assert 0.17 < vector.float().mean() < 0.23      # part 2: drop_rate 0.2
    assert not segmentation.any()
    # independent per part: both dropped about 0.5 * 0.2 of the time
    assert 0.08 < (label & vector).float().mean() < 0.12


def test_joint_drop_rate_drops_all_parts_together():
    c = MultiConditioner(parts=[{**p, "drop_rate": 0.0} for p in PARTS]).eval()
    c.drop_rate = 1.0
    b = batch()
    out, uncond = c.condition(b), c.unconditional(b)
    for role in out:
        torch.testing.assert_close(out[role], uncond[role], atol=0, rtol=0)


def test_bad_parts_are_named():
    with pytest.raises(ValueError, match="at least one part"):
        MultiConditioner(parts=[])
    with pytest.raises(ValueError, match=r"parts\[0\] must be a conditioner config with a `name`"):
        MultiConditioner(parts=[{"num_classes": 3}])
    with pytest.raises(ConfigError, match=r"conditioner=multi parts\[1\]: .*unknown"):
        MultiConditioner(parts=[PARTS[0], {"name": "no_such_conditioner"}])
    with pytest.raises(ValueError, match="same width"):
        MultiConditioner(parts=[PARTS[0], {**PARTS[1], "embed_dim": 16}])
    with pytest.raises(ConfigError, match=r"drop_rate must be in \[0, 1\]"):
        MultiConditioner(parts=[{**PARTS[0], "drop_rate": 1.5}])


def test_composes_with_auto_denoiser_dims_and_samples():
    cfg = compose_config([
        "conditioner=multi", "first_stage=identity", "denoiser=unet_tiny", "image_size=8",
        "conditioner.parts.0.embed_dim=32", "conditioner.parts.1.n_stages=0", "conditioner.parts.1.drop_rate=0.1",
        "sampler.steps=2",
    ])
    pipe = build_pipeline(cfg).eval()
    assert cfg.denoiser.context_dim == 32 and cfg.denoiser.in_channels == 3 + 8
    assert isinstance(pipe.conditioner, MultiConditioner)
    assert isinstance(pipe.conditioner.parts[0], ClassLabelConditioner)
    assert isinstance(pipe.conditioner.parts[1], SemanticMapConditioner)
    assert pipe.conditioner.parts[0].drop_rate == 0.1
    seg = torch.zeros(2, 8, 8, dtype=torch.long)
    images = pipe.sample({"label": [1, 2], "segmentation": seg}, guidance_scale=2.0, seed=0)
    assert images.shape == (2, 3, 8, 8)


def test_guidance_needs_a_trained_null():
    """With the default parts (a class dropped 10% of the time, a map never) guidance's null
    is the class's null beside the real map, which training shows; with no part that drops
    there is none, so Pipeline.sample warns."""
    import ldmkit

    label = {"name": "class_label", "num_classes": 5, "embed_dim": 8, "drop_rate": 0.1}
    segmentation = {"name": "semantic_map", "num_classes": 4, "n_stages": 0}
    assert MultiConditioner(parts=[label, segmentation]).learns_null_condition
    assert not MultiConditioner(parts=[{**label, "drop_rate": 0.0}, segmentation]).learns_null_condition
    joint = MultiConditioner(parts=[{**label, "drop_rate": 0.0}, segmentation])
    joint.drop_rate = 0.1  # the composite's own drop_rate drops all parts together
    assert joint.learns_null_condition
    pipe = ldmkit.compose(overrides=["conditioner=multi", "conditioner.parts.0.drop_rate=0", "first_stage=kl_tiny",
                                     "image_size=16", "sampler.steps=1"])  # fmt: skip
    with pytest.warns(UserWarning, match="null condition was never trained"):
        pipe.sample({"label": [1], "segmentation": torch.zeros(1, 16, 16, dtype=torch.long)}, guidance_scale=3.0, seed=0)
