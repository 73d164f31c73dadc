"""Which rank of an expert-parallel replica holds each routed expert, per MoE layer.

A replica of N ranks keeps everything but the routed experts on rank 0; the
experts are partitioned across all ranks by a placement map, expert -> rank.
The default is contiguous: rank r holds a contiguous range of experts, the
first E % N ranks one more than the others. Any map is allowed (uneven ones,
rank 0 holding none), for every MoE layer at once or per layer.

The text form (the future `--ep-placement` flag):

    ""  or  "contiguous"                      the contiguous default
    "0,0,1,1"  or  "[0, 0, 1, 1]"             expert -> rank, every MoE layer
    {"experts": [0, 0, 1, 1], "layers": {"3": [1, 1, 1, 0]}}
                                              a default map, and layer 3's own
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

FIELD = "ep_placement"  # the setting the text comes from, named in every error


@dataclass(frozen=True)
class ExpertPlacement:
    """The rank of each routed expert, per decoder layer (`layers`) or else by the default map (`owners`)."""

    num_experts: int
    world_size: int
    owners: tuple[int, ...]  # [E] rank of each expert, in every layer not in `layers`
    layers: Mapping[int, tuple[int, ...]] = field(default_factory=dict, hash=False)  # decoder layer -> [E] ranks

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"{FIELD}: world_size must be at least 1, got {self.world_size}")
        if self.num_experts < 1:
            raise ValueError(f"{FIELD}: a placement needs at least one expert, got {self.num_experts}")
        for where, owners in [("experts", self.owners), *((f"layers.{k}", v) for k, v in self.layers.items())]:
            self._check_map(where, owners)
        idle = set(range(1, self.world_size)) - {r for owners in (self.owners, *self.layers.values()) for r in owners}
        if idle:
            raise ValueError(f"{FIELD}: rank(s) {sorted(idle)} would hold no expert in any layer")

    def _check_map(self, where: str, owners: Sequence[int]) -> None:
        if len(owners) != self.num_experts:
            raise ValueError(f"{FIELD}: {where} lists {len(owners)} ranks, the model has {self.num_experts} experts")
        bad = sorted({r for r in owners if not _is_rank(r, self.world_size)}, key=str)
        if bad:
            raise ValueError(f"{FIELD}: {where} has rank(s) {bad} outside 0..{self.world_size - 1}")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Rank r holds a contiguous range; the first E % N ranks hold one expert more."""
        if world_size > num_experts:
            raise ValueError(f"{FIELD}: {world_size} ranks cannot each hold one of {num_experts} experts")
        base, extra = divmod(num_experts, world_size)
        owners = [rank for rank in range(world_size) for _ in range(base + (rank < extra))]
        return cls(num_experts, world_size, tuple(owners))

    @classmethod
    def parse(cls, text: str | None, num_experts: int, world_size: int) -> ExpertPlacement:
        """A placement from its text form (see the module docstring); ValueError naming the setting."""
        text = (text or "").strip()
        if text in ("", "contiguous"):
            return cls.contiguous(num_experts, world_size)
        try:
            value = json.loads(text) if text[0] in "[{" else [int(part) for part in text.split(",")]
        except ValueError as exc:
            raise ValueError(f"{FIELD}: not a placement ({exc}): {text!r}") from None
        if isinstance(value, list):
            return cls(num_experts, world_size, tuple(value))
        if not isinstance(value, dict) or not set(value) <= {"experts", "layers"}:
            raise ValueError(f'{FIELD}: expected a list of ranks or {{"experts": [...], "layers": {{...}}}}')
        layers = value.get("layers") or {}
        try:
            per_layer = {int(layer): tuple(owners) for layer, owners in layers.items()}
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{FIELD}: layers must map layer numbers to lists of ranks") from None
        default = value.get("experts")
        owners = tuple(default) if default is not None else cls.contiguous(num_experts, world_size).owners
        return cls(num_experts, world_size, owners, per_layer)

    def owners_of(self, layer: int) -> tuple[int, ...]:
        """[E] the rank holding each expert of decoder layer `layer`."""
        return self.layers.get(layer, self.owners)

    def experts_of(self, rank: int, layer: int) -> tuple[int, ...]:
        """The experts `rank` holds in `layer`, ascending."""
        return tuple(e for e, owner in enumerate(self.owners_of(layer)) if owner == rank)

    def to_json(self) -> str:
        """The canonical text form (what ranks compare to agree on one placement)."""
        value: dict = {"experts": list(self.owners)}
        if self.layers:
            value["layers"] = {str(k): list(v) for k, v in sorted(self.layers.items())}
        return json.dumps(value, separators=(",", ":"))


def _is_rank(value: object, world_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < world_size
