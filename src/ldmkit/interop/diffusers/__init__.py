"""ldmkit pipelines as diffusers folders, and diffusers folders as ldmkit pipelines.

:func:`~.folder.to_diffusers` writes what diffusers loads with ``from_pretrained``:

============== =====================================================================
``unet/``      ``UNet2DConditionModel`` (SpatialTransformer UNets: cross-attention) or
               ``UNet2DModel`` (AttentionBlock UNets: the paper's unconditional,
               super-resolution, inpainting and semantic models)
``vae/``       ``AutoencoderKL`` with ``scaling_factor`` = the pipeline's scale factor
``vqvae/``     ``VQModel`` (``scaling_factor`` 1.0 for the paper's VQ models)
``scheduler/`` the diffusers scheduler of the sampler's method (``DDIMScheduler``,
               ``PNDMScheduler`` for ``plms``, ``DPMSolverMultistepScheduler`` for
               ``dpmpp_2m``, ...: :data:`.scheduler.SAMPLER_TO_SCHEDULER`), the same betas,
               and the sampler's spacing (the paper's DDIM spacing is ``leading`` +
               ``steps_offset=1`` + ``set_alpha_to_one=False``)
``text_encoder/`` + ``tokenizer/`` for ``clip_text`` (``CLIPTextModel``, ``CLIPTokenizer``)
``bert/`` + ``tokenizer/`` for the paper's ``bert`` (77 tokens, a WordPiece ``vocab.txt``):
               diffusers' ``LDMBertModel`` and ``BertTokenizer``, run by
               ``LDMTextToImagePipeline`` (which names its first stage ``vqvae/`` whatever
               its kind)
``ldmkit_conditioner/`` every other conditioner (class labels, semantic maps, token-id
               BERTs, the low-res image of super-resolution...), which has no diffusers
               component: its config and weights, read back by ``from_diffusers``; diffusers
               ignores the folder (a ``low_res`` model with factor = f over a VQ first stage is
               what ``LDMSuperResolutionPipeline`` runs, and ``model_index.json`` names it)
============== =====================================================================

One module a job, lowest first:

- :mod:`.common`: the version written, ``ConversionError``, the checks of numbers read from
  a diffusers ``config.json``;
- :mod:`.renaming`: state dicts renamed row by row (the AttentionBlock's ``qkv`` split and
  joined), so ldmkit -> diffusers -> ldmkit is bit-identical;
- :mod:`.unet`, :mod:`.autoencoder`, :mod:`.scheduler`, :mod:`.text`: each component's
  weights and config, both ways;
- :mod:`.folder`: a whole pipeline as a folder and back (``to_diffusers``,
  ``read_diffusers``, ``fit_state``, ``describe``).

:mod:`ldmkit.interop.diffusers_format` re-exports the public names from one place.
"""
