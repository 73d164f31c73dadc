"""Open a Hugging Face checkpoint directory and stream its tensors.

A checkpoint directory holds `config.json`, the weights as one
`model.safetensors` or as shards listed by `model.safetensors.index.json`, and
optionally `generation_config.json` and tokenizer files. Opening one reads only
small JSON files and a few KiB of each weight file, so it is cheap enough to do
at registration time; the tensors themselves are read by `iter_tensors`, and
`load_weights` copies them into a model through its table of `WeightRule`s.
`load_checkpoint` reads only what a model holds: a rank of an
expert-parallel replica reads its own experts' tensors and rows, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# Bytes of each weight file that enter the revision hash, from its start and
# from its end. Hashing every byte of a 90 GB checkpoint would take minutes;
# the safetensors header (names, dtypes, shapes, offsets) plus samples of the
# data at both ends change whenever the weights are retrained or re-drawn.
REVISION_SAMPLE_BYTES = 64 * 1024
REVISION_HEX_CHARS = 12


@dataclass(frozen=True)
class Checkpoint:
    """What the worker knows about a checkpoint before reading its tensors."""

    path: Path
    model_id: str
    architecture: str
    revision: str  # short content hash: equal revisions mean equal weights and config
    max_context_tokens: int  # the model's max_position_embeddings
    weight_files: tuple[Path, ...]
    config: dict = field(hash=False)  # config.json as parsed
    generation_defaults: dict = field(hash=False)  # generation_config.json, minus bookkeeping keys


def open_checkpoint(path: str | Path, model_id: str | None = None) -> Checkpoint:
    """Read a checkpoint directory's metadata; raise ValueError if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is not a directory")
    config = _read_config(path)
    weight_files = _find_weight_files(path)
    return Checkpoint(
        path=path,
        model_id=model_id or path.resolve().name,
        architecture=_architecture(config, path),
        revision=_revision(path / CONFIG_FILE, weight_files),
        max_context_tokens=_max_context_tokens(config, path),
        weight_files=weight_files,
        config=config,
        generation_defaults=_read_generation_defaults(path),
    )


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (checkpoint name, tensor) pair, one weight file at a time."""
    for weight_file in ckpt.weight_files:
        with safe_open(weight_file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no {CONFIG_FILE}")
    return _read_json(config_file)


def _read_generation_defaults(path: Path) -> dict:
    file = path / GENERATION_CONFIG_FILE
    if not file.is_file():
        return {}
    raw = _read_json(file)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k != "transformers_version"}


def _architecture(config: dict, path: Path) -> str:
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError(f"{path / CONFIG_FILE} has no 'architectures' entry")
    return architectures[0]


def _max_context_tokens(config: dict, path: Path) -> int:
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path / CONFIG_FILE}: 'max_position_embeddings' must be a positive integer, got {value!r}")
    return value


def _find_weight_files(path: Path) -> tuple[Path, ...]:
    """The safetensors files, in index order for a sharded checkpoint."""
    index_file = path / WEIGHTS_INDEX_FILE
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        if not names:
            raise ValueError(f"{index_file} lists no weight files")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{index_file} lists weight files that are missing: {', '.join(missing)}")
        return tuple(path / n for n in names)
    if (path / SINGLE_WEIGHTS_FILE).is_file():
        return (path / SINGLE_WEIGHTS_FILE,)
    raise ValueError(
        f"checkpoint {str(path)!r} has no weights: expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}"
    )


# Files besides the weights whose content changes what a prompt turns into: the
# tokenizer, the chat template and the sampling defaults. They enter the
# revision, so that caches keyed by it never serve an answer made with other ones.
REVISION_TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", GENERATION_CONFIG_FILE)


def _revision(config_file: Path, weight_files: tuple[Path, ...]) -> str:
    """Hash config.json, the tokenizer and generation files, each weight file's name, size and sampled bytes."""
    digest = hashlib.sha256(config_file.read_bytes())
    for name in REVISION_TEXT_FILES:
        path = config_file.parent / name
        if path.is_file():
            digest.update(f"\0{name}\0".encode() + path.read_bytes())
    for weight_file in weight_files:
        size = weight_file.stat().st_size
        digest.update(f"\0{weight_file.name}\0{size}\0".encode())
        with weight_file.open("rb") as f:
            digest.update(f.read(REVISION_SAMPLE_BYTES))
            f.seek(max(size - REVISION_SAMPLE_BYTES, 0))
            digest.update(f.read(REVISION_SAMPLE_BYTES))
    return digest.hexdigest()[:REVISION_HEX_CHARS]


@dataclass(frozen=True)
class WeightRule:
    """One row of a model's checkpoint table: a checkpoint name pattern and the parameter it fills.

    `checkpoint` may hold `{layer}` and `{expert}` (matching decimal numbers);
    `{layer}` is substituted into `parameter`, `{expert}` selects the row of a
    parameter that stacks experts on dim 0. `shard` names the part of a fused
    parameter the tensor fills, looked up in the owning module's
    `shard_offsets` ({shard: (first row, rows)}). `parameter=None` marks a
    checkpoint tensor the model does not need (e.g. a saved rotary table).
    """

    checkpoint: str
    parameter: str | None
    shard: str | None = None

    def match(self, name: str) -> dict[str, str] | None:
        """The placeholder values if `name` fits this rule's pattern, else None."""
        found = _rule_regex(self.checkpoint).fullmatch(name)
        return found.groupdict() if found else None


@dataclass
class LoadRecord:
    """What a load read from the checkpoint: each tensor's name, and the bytes of the rows it read."""

    names: set[str] = field(default_factory=set)
    bytes_read: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.names.add(name)
        self.bytes_read += tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint tensor goes: the parameter part it fills, and which of its expert rows to read."""

    param_name: str  # canonical name (tied weights share one)
    expert: int | None  # the expert a per-expert tensor belongs to
    shard: str | None
    target: torch.Tensor  # the view of the parameter it is copied into
    rows: tuple[int, ...] | None  # for a stacked-experts tensor of which only some experts are held: those rows


class WeightPlan:
    """Maps checkpoint names to the parameter parts they fill, for a model that may hold only part of a checkpoint.

    `only(param_name)` selects the parameters this process holds (None: all of
    them); a module holding some routed experts only (`expert_rows`, expert ->
    row of its stacked parameters) takes those experts' tensors and rows. A
    name that fills nothing here (another rank's part) is never read.
    """

    def __init__(
        self, model: nn.Module, rules: Iterable[WeightRule], only: Callable[[str], bool] | None = None
    ) -> None:
        self.model, self.rules, self.only = model, tuple(rules), only
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.canonical = {id(p): name for name, p in model.named_parameters()}
        self.filled: dict[tuple[str, int | None, str | None], int] = {}  # piece -> elements written

    def piece(self, name: str) -> Piece | None:
        """Where checkpoint tensor `name` goes; None when this model does not hold it. ValueError if nothing could."""
        rule, values = _find_rule(self.rules, name)
        if rule.parameter is None:
            return None
        param_name = rule.parameter.format(**values)
        if param_name not in self.params:
            raise ValueError(f"model has no parameter {param_name}")
        if self.only is not None and not self.only(param_name):
            return None
        owner = self.model.get_submodule(param_name.rpartition(".")[0])
        expert_rows = getattr(owner, "expert_rows", None)  # None: every expert, each at its own row
        target, rows = self.params[param_name], None
        expert = int(values["expert"]) if "expert" in values else None
        if expert is not None:
            num_experts = getattr(owner, "num_experts", target.shape[0])
            if expert >= num_experts:
                raise ValueError(f"expert {expert} is out of range for {param_name} ({num_experts} experts)")
            row = expert if expert_rows is None else expert_rows.get(expert)
            if row is None:
                return None  # another rank's expert
            target = target[row]
        elif expert_rows is not None and owner.num_experts != len(expert_rows):
            rows = tuple(sorted(expert_rows))  # a stack of every expert, of which this model holds some
        if rule.shard is not None:
            start, size = owner.shard_offsets[rule.shard]
            target = target.narrow(0, start, size)
        return Piece(self.canonical[id(self.params[param_name])], expert, rule.shard, target, rows)

    def fill(self, name: str, piece: Piece, tensor: torch.Tensor) -> None:
        """Copy `tensor` (only `piece.rows` of it, when it is a stack the model holds part of) into its place."""
        if piece.rows is not None and tensor.shape[0] != len(piece.rows):
            tensor = tensor[list(piece.rows)]
        if piece.target.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"parameter {piece.param_name} expects {tuple(piece.target.shape)}"
            )
        with torch.no_grad():
            piece.target.copy_(tensor)
        self.filled[(piece.param_name, piece.expert, piece.shard)] = piece.target.numel()

    def check_all_filled(self) -> None:
        """ValueError naming the held parameters that the checkpoint did not fill."""
        _check_all_filled(self.model, self.filled, self.only)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], rules: Iterable[WeightRule]) -> None:
    """Copy checkpoint tensors into `model`, casting dtype; ValueError unless every parameter is filled."""
    plan = WeightPlan(model, rules)
    for name, tensor in tensors:
        piece = plan.piece(name)
        if piece is not None:
            plan.fill(name, piece, tensor)
    plan.check_all_filled()


def load_checkpoint(
    model: nn.Module,
    ckpt: Checkpoint,
    rules: Iterable[WeightRule],
    only: Callable[[str], bool] | None = None,
    record: LoadRecord | None = None,
) -> None:
    """Fill the parameters `model` holds (those `only` selects; some experts only, see `WeightPlan`) from `ckpt`.

    Reads only what they need: a tensor that fills nothing here is never
    read, and of a stack of every expert only the held experts' rows are.
    `record` collects what was read. ValueError unless every held parameter
    is filled.
    """
    plan = WeightPlan(model, rules, only)
    for weight_file in ckpt.weight_files:
        with safe_open(weight_file, framework="pt", device="cpu") as f:
            for name in f.keys():
                piece = plan.piece(name)
                if piece is None:
                    continue
                tensor = _read_rows(f.get_slice(name), piece.rows) if piece.rows is not None else f.get_tensor(name)
                if record is not None:
                    record.add(name, tensor)
                plan.fill(name, piece, tensor)
    plan.check_all_filled()


def _read_rows(tensor_slice, rows: tuple[int, ...]) -> torch.Tensor:
    """Rows `rows` (ascending) of a stored tensor, read as contiguous runs: the other rows are never read."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    pieces = [tensor_slice[start:stop] for start, stop in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _find_rule(rules: tuple[WeightRule, ...], name: str) -> tuple[WeightRule, dict[str, str]]:
    for rule in rules:
        values = rule.match(name)
        if values is not None:
            return rule, values
    raise ValueError(f"checkpoint tensor {name} matches no parameter of the model")


def _check_all_filled(
    model: nn.Module, filled: dict[tuple[str, int | None, str | None], int], only: Callable[[str], bool] | None = None
) -> None:
    written: dict[str, int] = {}
    for (param_name, _, _), count in filled.items():
        written[param_name] = written.get(param_name, 0) + count
    held = [(name, p) for name, p in model.named_parameters() if only is None or only(name)]
    missing = [name for name, p in held if written.get(name, 0) != p.numel()]
    if missing:
        raise ValueError(f"checkpoint does not fill these parameters: {', '.join(missing)}")


@functools.lru_cache(maxsize=None)
def _rule_regex(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for placeholder in ("layer", "expert"):
        regex = regex.replace(re.escape("{" + placeholder + "}"), f"(?P<{placeholder}>\\d+)")
    return re.compile(regex)
