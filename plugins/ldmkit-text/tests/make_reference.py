"""Writes the fixtures that pin ``bert``'s transformer to the paper's (not run by CI).

The reference is ``ldm/modules/x_transformer.py`` of the LDM paper's code,
https://github.com/CompVis/latent-diffusion (commit a506df5756472e2ebaf9078affdde2c4f1502cd4),
the module its ``BERTEmbedder`` wraps as
``TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(dim, depth))``.
It needs only torch and einops. Extract it and run, from anywhere outside the repo::

    git --git-dir=<latent-diffusion>/.git show HEAD:ldm/modules/x_transformer.py > /tmp/ref/x_transformer.py
    python plugins/ldmkit-text/tests/make_reference.py /tmp/ref/x_transformer.py

Outputs, in ``tests/fixtures/``:

* ``paper_key_layout.json``: state-dict keys and shapes of the paper's module for a tiny
  config and for the paper's text model (n_embed 1280, n_layer 32, max_seq_len 77,
  vocab 30522; built on the meta device, no weights);
* ``paper_tiny_reference.safetensors``: the tiny module's seeded weights (``state.<key>``),
  a batch of token ids (``tokens``, [PAD]=0 padded) and its ``return_embeddings=True``
  output (``embeddings``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).parent / "fixtures"
# heads / dim_head are shrunk from the paper's 8 x 64 to keep the weights file small;
# the paper-size layout below uses the defaults
TINY = {"num_tokens": 100, "max_seq_len": 12, "dim": 32, "depth": 2, "heads": 2, "dim_head": 8}
PAPER = {"num_tokens": 30522, "max_seq_len": 77, "dim": 1280, "depth": 32, "heads": 8, "dim_head": 64}


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("x_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(xt, cfg: dict) -> torch.nn.Module:
    return xt.TransformerWrapper(
        num_tokens=cfg["num_tokens"],
        max_seq_len=cfg["max_seq_len"],
        attn_layers=xt.Encoder(
            dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"], attn_dim_head=cfg["dim_head"]
        ),
    )


def layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def dump_json(doc: dict) -> str:
    """JSON with one state-dict key per line (readable diffs when the layout changes)."""
    lines = ["{", f' "source": {json.dumps(doc["source"])},']
    for i, size in enumerate(("tiny", "paper")):
        lines.append(f' "{size}": {{"config": {json.dumps(doc[size]["config"])}, "shapes": {{')
        items = list(doc[size]["shapes"].items())
        for j, (key, shape) in enumerate(items):
            lines.append(f"  {json.dumps(key)}: {json.dumps(shape)}" + ("," if j < len(items) - 1 else ""))
        lines.append(" }}" + ("," if i == 0 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(path: str) -> None:
    xt = load_reference(path)
    FIXTURES.mkdir(exist_ok=True)

    torch.manual_seed(0)
    tiny = build(xt, TINY).eval()
    with torch.no_grad():  # LayerNorms start at 1 / 0; move them so that they are tested too
        for name, p in tiny.named_parameters():
            if re.match(r"(norm|attn_layers\.layers\.\d+\.0)\.", name):
                p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, TINY["num_tokens"], (3, TINY["max_seq_len"]), generator=gen)
    tokens[0, 5:] = 0  # [PAD] tail, as BERT tokenization with padding="max_length" leaves
    tokens[1, 9:] = 0
    with torch.no_grad():
        out = tiny(tokens, return_embeddings=True)

    tensors = {f"state.{k}": v.contiguous() for k, v in tiny.state_dict().items()}
    tensors.update(tokens=tokens, embeddings=out.contiguous())
    save_file(tensors, FIXTURES / "paper_tiny_reference.safetensors", metadata={"config": json.dumps(TINY)})

    with torch.device("meta"):
        paper = build(xt, PAPER)
    doc = {
        "source": "CompVis/latent-diffusion@a506df5 ldm/modules/x_transformer.py TransformerWrapper",
        "tiny": {"config": TINY, "shapes": layout(tiny)},
        "paper": {"config": PAPER, "shapes": layout(paper)},
    }
    (FIXTURES / "paper_key_layout.json").write_text(dump_json(doc))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} <latent-diffusion>/ldm/modules/x_transformer.py")
    main(sys.argv[1])
