"""fms-dyt's tokenizers: the offline default, its transformers twin, and train_tokenizer.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fms_dyt.data import TokenizerConfig, load_tokenizer
from fms_dyt.data.synthetic import write_shards
from fms_dyt.data.tokenizer import TextEncoder, default_model_file

ROOT = Path(__file__).resolve().parent.parent
TRICKY = ["Hello world", "  two leading spaces", "x  = 1\n    y = [1, 2]\n\tz", "digits 1234567 and 3.14",
          "émojis 🙂, 中文, Ελληνικά", "a" + " " * 19 + "b", "trailing  ", "line\n\n\nbreaks", "</s> is literal text"]


def stdlib_texts(n=60):
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def test_default_loads_offline_and_matches_sentencepiece(tmp_path):
    tok = load_tokenizer(TokenizerConfig())
    assert isinstance(tok, PreTrainedTokenizerBase) and len(tok) == 32000
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(default_model_file()))
    texts = TRICKY + stdlib_texts()
    assert tok(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts]
    assert tok("Hello")["input_ids"] == [1] + sp.encode("Hello")  # BOS added, no EOS
    assert [tok.decode(sp.encode(t)) for t in TRICKY[:-1]] == TRICKY[:-1]
    # saved beside a checkpoint and loaded back the way lm-eval does
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts]


def test_without_bos_and_the_pipeline_encoder():
    tok = load_tokenizer(TokenizerConfig(add_bos=False))
    assert tok("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]
    enc = TextEncoder(TokenizerConfig())
    assert enc.encode(TRICKY) == tok(TRICKY, add_special_tokens=False)["input_ids"]
    assert (enc.bos_id, enc.eos_id, enc.vocab_size) == (1, 2, 32000)


def test_builtin_sample_tokenizer_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found by its name wherever the command runs
    cfg = TokenizerConfig(path="sample-8k")
    tok, enc = load_tokenizer(cfg), TextEncoder(cfg)
    assert enc.vocab_size == len(tok) == 8000 and (enc.bos_id, enc.eos_id) == (1, 2)
    texts = TRICKY + stdlib_texts(20)
    assert tok(texts, add_special_tokens=False)["input_ids"] == enc.encode(texts)
    # trained on code and docs: fewer tokens than the 32k default would suggest for its size
    default = TextEncoder(TokenizerConfig())
    assert sum(map(len, enc.encode(texts))) < 1.3 * sum(map(len, default.encode(texts)))
    (tmp_path / "sample-8k").mkdir()  # the name always means the built-in, whatever the directory holds
    assert TextEncoder(cfg).encode(texts) == enc.encode(texts)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "missing")))
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="not a SentencePiece .model"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "vocab.txt")))


def test_train_tokenizer_writes_a_directory_transformers_loads(tmp_path):
    write_shards(tmp_path / "corpus", files=2, rows=150)
    out = tmp_path / "tok"
    run = subprocess.run([sys.executable, str(ROOT / "tokenizer" / "train_tokenizer.py"), "--out", str(out),
                          "--vocab-size", "320", "--max-chars", "100000", "--threads", "1",
                          "data=local", f"data.path={tmp_path / 'corpus'}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == 320
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["the model  data token 12345", "é unseen characters fall back to bytes", "def f():\n    return 1"]
    assert tok(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts]
    assert sp.encode("é")[-2:] == [sp.piece_to_id("<0xC3>"), sp.piece_to_id("<0xA9>")]  # byte fallback
    assert sp.encode("12345")[-5:] == [sp.piece_to_id(d) for d in "12345"]  # split digits
    # fms-dyt uses it through tokenizer.path
    assert TextEncoder(TokenizerConfig(path=str(out))).encode(texts) == [sp.encode(t) for t in texts]
