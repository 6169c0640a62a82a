"""Tokenizers for fms-dyt: the offline default, user models, and a fast encoder for the pipeline.

A SentencePiece BPE model (the default one shipped in mistral-common, a ``.model`` file, a
directory holding ``tokenizer.model``, or a hub repository that has one) is the single source of
truth: the pipeline encodes with ``sentencepiece`` itself, and ``load_tokenizer`` returns a
``transformers`` tokenizer built to give exactly the same ids (checked by the tests), so the
copy saved beside exported weights and used by lm-eval matches training. transformers' own
conversion of such models orders BPE merges by piece id instead of score and drops
sentencepiece's whitespace splitting, which changes the ids of indented code and repeated spaces.
Tokenizers without a SentencePiece model (any other transformers tokenizer) are used as they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fms_dyt.data.config import TokenizerConfig, as_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# sentencepiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_BPE = 2
_CONVERTER_VERSION = b"fms-dyt-converter-1"  # part of the cache key: a fixed converter rebuilds caches


def cache_root() -> Path:
    """fms-dyt's cache: $FMS_DYT_CACHE, else ~/.cache/fms_dyt (sample corpus, converted tokenizers)."""
    return Path(os.environ.get("FMS_DYT_CACHE") or Path.home() / ".cache" / "fms_dyt").expanduser()


def default_model_file() -> Path:
    """The 32,000-piece LLaMA-2-spec BPE model inside the installed mistral-common package."""
    try:
        import mistral_common
    except ImportError:
        raise RuntimeError(
            "the default tokenizer comes from the mistral-common package: pip install mistral-common, "
            "or set tokenizer.path=<.model file, directory or hub name>"
        ) from None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from mistral-common {getattr(mistral_common, '__version__', '?')}; "
                           "reinstall it or set tokenizer.path=...")
    return path


# Tokenizers that ship with fms-dyt, by the name ``tokenizer.path`` gives them; the name means the
# built-in wherever the command runs (a run's config.yaml must mean the same thing on resume).
BUILTIN = {
    # 8,000 BPE pieces (LLaMA-2's trainer settings) trained by tokenizer/train_tokenizer.py on the
    # sample corpus: a model of width 64 spends most of its time in the embedding and head, and a
    # 32k vocabulary there is mostly pieces the sample corpus never uses.
    "sample-8k": Path(__file__).parent / "tokenizers" / "sample-8k.model",
}


@dataclass
class _Resolved:
    sp_model: Optional[Path]  # a SentencePiece model, when there is one
    hf_name: Optional[str]  # otherwise what AutoTokenizer loads


def _resolve(cfg: TokenizerConfig) -> _Resolved:
    if cfg.path is None:
        return _Resolved(default_model_file(), None)
    if cfg.path in BUILTIN:
        return _Resolved(BUILTIN[cfg.path], None)
    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(f"tokenizer.path={cfg.path!r} is a file but not a SentencePiece .model; "
                             "give a .model file or a tokenizer directory")
        return _Resolved(path, None)
    if path.is_dir():
        model = path / "tokenizer.model"
        return _Resolved(model, None) if model.is_file() else _Resolved(None, str(path))
    if cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:
        raise FileNotFoundError(f"tokenizer.path={cfg.path!r} does not exist")
    return _Resolved(_hub_sentencepiece(cfg.path), cfg.path)


def _hub_sentencepiece(repo: str) -> Optional[Path]:
    """The repository's tokenizer.model from the hub or its cache; None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, "tokenizer.model"))
    except EntryNotFoundError:
        return None
    except Exception as e:
        raise RuntimeError(
            f"tokenizer.path={repo!r}: could not fetch it from the Hugging Face hub or its cache ({type(e).__name__}: "
            f"{e}). Download it where the hub is reachable (huggingface-cli download {repo}) and set "
            "tokenizer.path=<that directory>, or set HF_HUB_OFFLINE=1 if it is already in the cache."
        ) from None


def _sentencepiece_to_tokenizers(model_file: Path, add_bos: bool):
    """A ``tokenizers.Tokenizer`` giving the same ids as sentencepiece for this BPE model."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != _BPE:
        raise ValueError(f"{model_file}: only SentencePiece BPE models are supported (LLaMA-2's kind)")
    if spec.treat_whitespace_as_suffix:
        raise ValueError(f"{model_file}: treat_whitespace_as_suffix models are not supported")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    # sentencepiece merges the adjacent pair whose result scores highest; tokenizers applies the
    # lowest-ranked merge, so rank every way of building a piece by that piece's score.
    merges = []
    for i, p in enumerate(pieces):
        if p.type != _NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = vocab.get(p.piece[:cut]), vocab.get(p.piece[cut:])
            if left is not None and right is not None and pieces[left].type == pieces[right].type == _NORMAL:
                merges.append((-p.score, i, left, p.piece[:cut], p.piece[cut:]))
    merges.sort()
    unk = pieces[spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=spec.byte_fallback))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    if spec.split_by_whitespace:
        # sentencepiece's words start at a space (a run of spaces when whitespace-only pieces are allowed)
        word = "▁+[^▁]*|[^▁]+" if spec.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    specials = [p.piece for p in pieces if p.type in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    users = [p.piece for p in pieces if p.type == _USER_DEFINED]
    if users:
        tok.add_tokens([AddedToken(s, normalized=False) for s in users])
    bos = pieces[spec.bos_id].piece if spec.bos_id >= 0 else None
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)])
    names = {"unk_token": unk, "bos_token": bos,
             "eos_token": pieces[spec.eos_id].piece if spec.eos_id >= 0 else None,
             "pad_token": pieces[spec.pad_id].piece if spec.pad_id >= 0 else None}
    return tok, {k: v for k, v in names.items() if v is not None}


def write_hf_tokenizer(model_file: str | Path, out_dir: str | Path, add_bos: bool = True):
    """Write a directory transformers loads (tokenizer.json, tokenizer_config.json and the
    SentencePiece ``tokenizer.model`` itself) that encodes exactly as ``model_file``."""
    from transformers import PreTrainedTokenizerFast

    model_file, out_dir = Path(model_file), Path(out_dir)
    tok, names = _sentencepiece_to_tokenizers(model_file, add_bos)
    # split_special_tokens: "</s>" in a text is text, as for sentencepiece, not an EOS id
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, add_bos_token=add_bos, add_eos_token=False,
                                 split_special_tokens=True, **names)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    if model_file.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(model_file, out_dir / "tokenizer.model")
    return hf


def _converted_dir(model_file: Path, add_bos: bool) -> Path:
    """The cached transformers directory for this model (built once, atomically)."""
    digest = hashlib.sha256(model_file.read_bytes() + _CONVERTER_VERSION).hexdigest()[:16]
    target = cache_root() / "tokenizers" / f"{digest}-bos{int(add_bos)}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        write_hf_tokenizer(model_file, tmp, add_bos)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(cfg) -> "PreTrainedTokenizerFast":
    """The transformers tokenizer of ``cfg`` (a TokenizerConfig): save it with ``save_pretrained``
    beside exported weights; lm-eval loads it back. It adds BOS when ``add_bos`` (never EOS)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = as_config(cfg, TokenizerConfig)
    where = _resolve(cfg)
    if where.sp_model is not None:
        return PreTrainedTokenizerFast.from_pretrained(str(_converted_dir(where.sp_model, cfg.add_bos)))
    try:
        return AutoTokenizer.from_pretrained(where.hf_name)
    except OSError as e:
        raise RuntimeError(
            f"tokenizer.path={cfg.path!r} could not be loaded ({e}). Give a local directory, a .model file, or a "
            "hub name reachable from here (or cached, with HF_HUB_OFFLINE=1)."
        ) from None


class TextEncoder:
    """What the pipeline needs from a tokenizer: batch encoding without special tokens, the
    BOS/EOS ids and decoding (for previews). SentencePiece when there is a model, else transformers."""

    def __init__(self, cfg):
        cfg = as_config(cfg, TokenizerConfig)
        self.cfg = cfg
        where = _resolve(cfg)
        self._sp = self._hf = None
        if where.sp_model is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(where.sp_model))
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.vocab_size = self._sp.get_piece_size()
        else:
            self._hf = load_tokenizer(cfg)
            self.bos_id, self.eos_id = self._hf.bos_token_id, self._hf.eos_token_id
            self.vocab_size = len(self._hf)
        for flag, value in (("add_bos", self.bos_id), ("add_eos", self.eos_id)):
            if getattr(cfg, flag) and (value is None or value < 0):
                raise ValueError(f"tokenizer.{flag}=true but tokenizer.path={cfg.path!r} has no "
                                 f"{flag[4:].upper()} token; set tokenizer.{flag}=false")

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._sp is not None:
            # One call per text (DataLoader workers are the parallelism): SentencePiece's call on a
            # list starts a thread pool every time, even for one thread, which cost a worker ~8% of
            # its documents per second on short documents (docs/performance.md)
            return [self._sp.encode(text) for text in texts]
        return [e.ids for e in self._hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)
