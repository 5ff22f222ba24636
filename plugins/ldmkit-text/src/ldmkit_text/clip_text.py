"""``clip_text``: a CLIP text encoder (``transformers`` ``CLIPTextModel`` + ``CLIPTokenizer``)
from a local folder, frozen — Stable Diffusion v1's ``FrozenCLIPEmbedder``.

As Stable Diffusion v1 uses it: prompts are padded to ``max_length`` (77) tokens with the
tokenizer's pad token, the encoder sees the token ids alone (no attention mask; every position
attends causally as CLIP was trained), and the last hidden state (after the final layer norm)
is the ``crossattn`` condition. The empty prompt is the unconditional input.

The parameters live under ``transformer`` (``transformer.text_model.*``), the names of
``cond_stage_model.transformer.text_model.*`` in a Stable Diffusion checkpoint, so an imported
checkpoint's text encoder loads one-to-one (``pretrained=False`` builds the architecture from
the folder's ``config.json`` and leaves the weights to the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit_text.prompts import PromptEncoder
from ldmkit_text.tokenizer import ModelNotFoundError, quiet_loading

__all__ = ["ClipTextConditioner"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class ClipTextConditioner(PromptEncoder):
    """Prompts -> ``crossattn`` B x max_length x hidden (CLIP's last hidden state).

    :param name_or_path: a local folder with a CLIP text model's ``config.json`` and its
        tokenizer (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``), e.g. a download of
        ``openai/clip-vit-large-patch14`` (Stable Diffusion v1's). Nothing is downloaded.
    :param tokenizer_path: the tokenizer's folder when it is not ``name_or_path`` (a diffusers
        folder keeps ``text_encoder/`` and ``tokenizer/`` apart).
    :param max_length: tokens per prompt, start and end tokens included (77 in SD v1); longer
        prompts are cut, with one warning per run.
    :param pretrained: load the folder's weights (frozen, kept by reference in checkpoints);
        ``False`` builds the architecture only, for weights that come from elsewhere (an
        imported Stable Diffusion checkpoint; they are then saved with the pipeline).
    :param input_key: the batch key holding the prompts.
    """

    def __init__(
        self,
        *,
        name_or_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        max_length: int = 77,
        pretrained: bool = True,
        input_key: str = "caption",
    ) -> None:
        super().__init__(input_key=input_key)
        if name_or_path is None:
            raise ModelNotFoundError(
                "clip_text.name_or_path is not set: give a local CLIP text model folder (config.json, "
                "vocab.json, merges.txt; weights unless pretrained=false), e.g. a download of "
                "openai/clip-vit-large-patch14 for Stable Diffusion v1; nothing is downloaded"
            )
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"CLIP text model folder {str(path)!r} has no config.json (clip_text.name_or_path must "
                "be a local folder with the model's config.json and tokenizer files; nothing is downloaded)"
            )
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        tokenizer_dir = path if tokenizer_path is None else Path(tokenizer_path).expanduser()
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(
                str(tokenizer_dir), local_files_only=True
            )
            config = CLIPTextConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise ModelNotFoundError(
                f"cannot load the CLIP tokenizer ({str(tokenizer_dir)!r}) or config ({str(path)!r}): {err}"
            ) from err
        if pretrained:
            if not any((path / name).is_file() for name in WEIGHT_FILES):
                raise ModelNotFoundError(
                    f"CLIP text model folder {str(path)!r} holds no weights ({', '.join(WEIGHT_FILES)}); "
                    "set clip_text.pretrained=false when the weights come from a checkpoint"
                )
            with quiet_loading():
                self.transformer = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
        else:
            self.transformer = CLIPTextModel(config)
        limit = config.max_position_embeddings
        if not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(
                f"clip_text max_length must be an int in [2, {limit}] for {str(path)!r}, got {max_length!r}"
            )
        self.path, self.tokenizer_path, self.max_length = path, tokenizer_dir, max_length
        self.pretrained = bool(pretrained)
        self.transformer.requires_grad_(False)
        self.transformer.eval()
        self.crossattn_dim = config.hidden_size
        self.vector_dim = None

    def frozen_references(self) -> dict[str, dict[str, str]]:
        """With ``pretrained`` the encoder is a reference to its folder (:mod:`ldmkit.frozen`);
        weights from a checkpoint are not, and are saved with the pipeline."""
        if not self.pretrained:
            return {}
        from ldmkit.frozen import files_digest, weights_digest

        folders = dict.fromkeys([self.path, self.tokenizer_path])  # the tokenizer may live apart
        return {"transformer": {"source": str(self.path.absolute()), "sha256": weights_digest(self.path),
                                "files_sha256": files_digest(*folders)}}  # fmt: skip

    def pipeline_files(self, *, embed_frozen: bool) -> dict[str, Any]:
        """By reference, the folders by their absolute paths; with the weights in the
        pipeline, the folders' config and tokenizer files copied into it, and
        ``pretrained=False`` (:mod:`ldmkit.pipeline_files`)."""
        folders = {"name_or_path": self.path}
        if self.tokenizer_path != self.path:
            folders["tokenizer_path"] = self.tokenizer_path
        if self.pretrained and not embed_frozen:
            return {option: str(folder.absolute()) for option, folder in folders.items()}
        return {**folders, "pretrained": False}

    def train(self, mode: bool = True) -> ClipTextConditioner:
        super().train(mode)
        self.transformer.eval()  # frozen: no dropout either
        return self

    def tokens(self, prompts: list[str]) -> Tensor:
        """B x max_length token ids, padded as Stable Diffusion v1 pads them."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        self.note_truncated(sum(n > self.max_length for n in lengths), self.max_length)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )["input_ids"]
        return ids.to(next(self.transformer.parameters()).device)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            hidden = self.transformer(input_ids=self.tokens(prompts)).last_hidden_state
        return {"crossattn": hidden}

    def extra_repr(self) -> str:
        return (
            f"path={str(self.path)!r}, max_length={self.max_length}, pretrained={self.pretrained}"
        )
