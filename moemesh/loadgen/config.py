"""The benchmark's settings: targets, load levels, goodput limits and the dataset, validated once.

Invalid values raise `ValueError` starting with the flag's name, as the services' settings do.
"""

from __future__ import annotations

import math
import pathlib
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Literal

SCHEMES = ("grpc", "grpcs", "http", "https")
LoadMode = Literal["concurrency", "rate"]


@dataclass(frozen=True)
class Target:
    """One server to measure: `grpc://HOST:PORT` (the mesh's gRPC API) or `http://HOST:PORT` (OpenAI-compatible)."""

    url: str

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.url).scheme

    @property
    def is_grpc(self) -> bool:
        return self.scheme in ("grpc", "grpcs")

    @property
    def address(self) -> str:
        """HOST:PORT, as a gRPC channel takes it."""
        return urllib.parse.urlsplit(self.url).netloc

    @property
    def base_url(self) -> str:
        """The HTTP server's root: the URL without a trailing `/` or `/v1` (the API paths add `/v1/...`)."""
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


def parse_target(text: str) -> Target:
    """A `--target` value; ValueError unless it is SCHEME://HOST:PORT with a known scheme."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"--target: expected grpc://HOST:PORT or http://HOST:PORT, got {text!r}")
    if parts.scheme.startswith("grpc") and (parts.port is None or parts.path not in ("", "/")):
        raise ValueError(f"--target: a gRPC target is grpc://HOST:PORT with no path, got {text!r}")
    return Target(text)


@dataclass(frozen=True)
class LoadLevel:
    """One point of a sweep: `concurrency` requests in flight (closed loop) or a Poisson `rate` in requests/s."""

    mode: LoadMode
    value: float

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c={int(self.value)}"
        return f"{self.value:g} req/s"


def parse_levels(mode: LoadMode, text: str) -> tuple[LoadLevel, ...]:
    """`--concurrency 1,8,32` or `--rate 1,2,4` as load levels, in the order given."""
    flag = f"--{mode}"
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: expected at least one value")
    for value in values:
        if mode == "concurrency" and (value < 1 or value != int(value)):
            raise ValueError(f"{flag}: each level is a whole number of requests >= 1, got {value:g}")
        if mode == "rate" and not 0 < value < math.inf:
            raise ValueError(f"{flag}: each rate is a finite number of requests/s > 0, got {value:g}")
    return tuple(LoadLevel(mode, value) for value in values)


@dataclass(frozen=True)
class GoodputLimits:
    """The service-level objective a request must meet to count towards goodput; None: no limit on that figure."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


def parse_goodput(text: str) -> GoodputLimits:
    """`--goodput ttft:500,tpot:50` (milliseconds; keys ttft, tpot, e2e)."""
    limits: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"--goodput: unknown figure {name!r}; use ttft, tpot or e2e")
        try:
            limits[f"{name}_ms"] = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {name} needs a number of milliseconds, got {value!r}") from None
        if not limits[f"{name}_ms"] > 0:
            raise ValueError(f"--goodput: {name} must be > 0 ms")
    if not limits:
        raise ValueError("--goodput: expected NAME:MS[,NAME:MS...], e.g. ttft:500,tpot:50")
    return GoodputLimits(**limits)


@dataclass(frozen=True)
class DatasetConfig:
    """What the prompts look like: synthetic (token counts, shared prefix) or read from a file."""

    prompt_tokens: int = 256
    output_tokens: int = 128
    shared_prefix_ratio: float = 0.0
    tokenizer_dir: pathlib.Path | None = None
    prompt_file: pathlib.Path | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens: must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"--output-tokens: must be >= 1, got {self.output_tokens}")
        if not 0.0 <= self.shared_prefix_ratio <= 1.0:
            raise ValueError(f"--shared-prefix-ratio: must be within [0, 1], got {self.shared_prefix_ratio}")


@dataclass(frozen=True)
class BenchConfig:
    """Everything one `moemesh bench` run does; built once from the flags."""

    targets: tuple[Target, ...]
    levels: tuple[LoadLevel, ...]
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    requests: int | None = 64  # per level; None: bounded by `duration` alone
    duration: float | None = None  # seconds per level during which requests are sent
    warmup: int = 2
    temperature: float = 0.0
    seed: int = 0  # the dataset's, the arrivals' and (when sampling) each request's
    allow_cache: bool = False
    timeout: float = 300.0  # seconds, per request
    goodput: GoodputLimits | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("--target: give at least one")
        if not self.levels:
            raise ValueError("--concurrency/--rate: give at least one level")
        if self.requests is None and self.duration is None:
            raise ValueError("--requests/--duration: give at least one, so that each level ends")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests: must be >= 1, got {self.requests}")
        if self.duration is not None and not (0 < self.duration < math.inf):
            raise ValueError(f"--duration: must be a positive number of seconds, got {self.duration}")
        if self.warmup < 0:
            raise ValueError(f"--warmup: must be >= 0, got {self.warmup}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"--temperature: must be within [0, 2], got {self.temperature}")
        if not self.timeout > 0:
            raise ValueError(f"--timeout: must be > 0 seconds, got {self.timeout}")

    def to_json(self) -> dict:
        """The settings as JSON values, for the report; the API key is never written, only whether one was set."""
        settings = asdict(self)
        settings.pop("api_key")
        settings["api_key_set"] = self.api_key is not None
        settings["targets"] = [t.url for t in self.targets]
        settings["dataset"] = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in settings["dataset"].items()}
        return settings
