"""ldmkit's text conditioners: ``bert`` (the paper's, trained jointly) and ``frozen_text``."""

from ldmkit_text.bert import BertConditioner
from ldmkit_text.frozen_text import FrozenTextConditioner
from ldmkit_text.prompts import PromptTypeError, TextConditioner
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
    "FrozenTextConditioner",
    "ModelNotFoundError",
    "PromptTypeError",
    "TextConditioner",
    "TextTransformer",
    "VocabError",
    "VocabNotFoundError",
    "WordPieceTokenizer",
    "default_model_dir",
]
