"""The module the ``ldmkit`` entry point names: it holds the hook implementations."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    # import lazily: `ldmkit plugins` stays fast
    from ldmkit_thresholding.thresholded_ddim import ThresholdedDDIMSampler

    register("thresholded_ddim", ThresholdedDDIMSampler)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    # conf/sampler/thresholded_ddim.yaml becomes the option `sampler=thresholded_ddim`
    register(Path(__file__).parent / "conf")
