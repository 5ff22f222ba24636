"""ldmkit's text conditioners: ``bert`` (the paper's, trained jointly), ``frozen_text`` and
``clip_text`` (Stable Diffusion v1's frozen CLIP text encoder)."""

from ldmkit_text.bert import BertConditioner
from ldmkit_text.clip_text import ClipTextConditioner
from ldmkit_text.frozen_text import FrozenTextConditioner
from ldmkit_text.prompts import PromptEncoder, PromptTypeError, TextConditioner
from ldmkit_text.tokenizer import (
    ModelNotFoundError,
    VocabError,
    VocabNotFoundError,
    WordPieceTokenizer,
    default_model_dir,
)
from ldmkit_text.transformer import TextTransformer

__all__ = [
    "BertConditioner",
    "ClipTextConditioner",
    "FrozenTextConditioner",
    "ModelNotFoundError",
    "PromptEncoder",
    "PromptTypeError",
    "TextConditioner",
    "TextTransformer",
    "VocabError",
    "VocabNotFoundError",
    "WordPieceTokenizer",
    "default_model_dir",
]
