"""Operations that can take more than ~2 s show a progress bar on stderr (tqdm, shown only
once 2 s have passed; forced here by making every bar eager)."""

from __future__ import annotations

import pytest
from gguf_fixture import write_gguf
from test_integrity import FIXTURES
from tqdm import tqdm

from einplan.apps.data import encode_text
from einplan.formats.gguf_convert import convert_gguf
from einplan.formats.tokenizer import byte_tokenizer, train_tokenizer


@pytest.fixture
def eager_bars(monkeypatch):
    """Every tqdm bar shows at once instead of after its delay."""
    original = tqdm.__init__

    def eager(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "delay": 0})

    monkeypatch.setattr(tqdm, "__init__", eager)


def test_gguf_convert_shows_progress(eager_bars, tmp_path, capsys):
    path = write_gguf(FIXTURES / "llama_gqa_tied", tmp_path / "m.gguf")
    convert_gguf(path, tmp_path / "hf")
    err = capsys.readouterr().err
    assert "read GGUF" in err and "bind weights" not in err


def test_corpus_tokenisation_and_tokenizer_training_show_progress(eager_bars, tmp_path, capsys):
    text = "JULIET: O Romeo, Romeo! wherefore art thou Romeo?\n" * 200
    assert len(encode_text(text, byte_tokenizer())) == len(text.encode())
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)
    train_tokenizer(corpus, 300)
    err = capsys.readouterr().err
    assert "tokenize" in err and "learn tokenizer" in err
