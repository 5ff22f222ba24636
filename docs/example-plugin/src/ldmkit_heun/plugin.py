"""The module the ``ldmkit`` entry point names: it holds the hook implementations."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    from ldmkit_heun.heun import HeunSampler  # import lazily: `ldmkit plugins` stays fast

    register("heun", HeunSampler)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    # conf/sampler/heun.yaml becomes the option `sampler=heun`
    register(Path(__file__).parent / "conf")
