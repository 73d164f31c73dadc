"""The grammar libraries for structured outputs side by side: llguidance (ours), xgrammar and outlines-core.

The evidence for `services/core/structured.py`'s choice. Every library gets the
same tokenizer (a byte-level BPE of 32,000 tokens trained once on the Python
standard library's sources: a realistic vocabulary without a model hub), the
same JSON schema (`INVOICE_SCHEMA`) and the same regular expression, and is
measured through its batched-serving API:

  1. tokenizer preparation (once per model);
  2. compiling a schema never seen (cold): the median over distinct schemas, and
     the same plus the first mask (llguidance compiles lazily, during masks);
  3. the allowed-token bitmask, token by token along a valid document (then the
     token is accepted): mean, median and p99 microseconds per mask;
  4. whether the schema compiles, whether the valid document passes token by
     token, and which of minimum / maximum / pattern / format a library
     enforces (a document breaking each, fed token by token, must be refused).

xgrammar and outlines-core are not project dependencies; a missing one is
reported and the others still run. Usage:

    python -m bench.grammar_libraries [--workdir DIR] [--schemas 5] [--walks 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import pathlib
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable

import llguidance
import numpy as np
import tokenizers
import torch

from bench.structured_bench import INVOICE_SCHEMA
from moemesh.services.core.structured import JSON_OPTIONS

VOCAB_SIZE = 32_000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
EOS = "</s>"
CORPUS_BYTES = 8 * 1024 * 1024
# JSON as json.dumps writes it, for every library: ", " and ": ", no other whitespace (JSON_OPTIONS' choice).
SEPARATORS = (", ", ": ")

INVOICE = {
    "number": "INV-2024-0042", "date": "2024-05-17",
    "customer": {"name": "Acme Tools GmbH", "vat_id": "DE123456789"},
    "lines": [{"sku": "BOLT-M8-ZN", "quantity": 200, "unit_price": 0.12},
              {"sku": "NUT-M8-ZN", "quantity": 200, "unit_price": 0.05},
              {"sku": "WASHER-M8", "quantity": 400, "unit_price": 0.02},
              {"sku": "DRILL-HSS-10", "quantity": 2, "unit_price": 14.9},
              {"sku": "GLOVES-L", "quantity": 12, "unit_price": 3.75}],
    "total": 150.8, "currency": "EUR",
}
INVOICE_REGEX = r"INV-[0-9]{4} (paid|open|void) [0-9]{1,6}\.[0-9]{2}"
REGEX_TEXT = "INV-0042 paid 1234.50"

# One property per feature whose enforcement is probed; each violation breaks exactly one of them.
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10},
                   "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                   "day": {"type": "string", "format": "date"}},
    "required": ["n", "code", "day"],
}
PROBE_VALID = {"n": 5, "code": "ABC", "day": "2024-05-17"}
PROBE_VIOLATIONS = {"minimum": {"n": 0}, "maximum": {"n": 11}, "pattern": {"code": "abcd"},
                    "format": {"day": "17 May 2024"}}


# ---- the tokenizer --------------------------------------------------------------------------------------------
def build_tokenizer(workdir: pathlib.Path) -> pathlib.Path:
    """A byte-level BPE of VOCAB_SIZE tokens in `workdir` (tokenizer.json + tokenizer_config.json), trained once."""
    if (workdir / "tokenizer.json").exists():
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tokenizer.train_from_iterator(stdlib_sources(CORPUS_BYTES), trainer)
    tokenizer.save(str(workdir / "tokenizer.json"))
    # What transformers' PreTrainedTokenizerFast needs to load the directory (xgrammar reads that object).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": EOS,
              "unk_token": "<unk>", "model_max_length": 8192, "clean_up_tokenization_spaces": False}
    (workdir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return workdir


def stdlib_sources(limit: int):
    """The standard library's .py files, in a fixed order, up to `limit` bytes."""
    total = 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text.encode())
        if total > limit:
            return
        yield text


def token_bytes(tokenizer: tokenizers.Tokenizer) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes (special tokens left out), undoing GPT-2's byte-to-character alphabet:
    `tokenizers` keeps that table internal, and decoding one token at a time loses split UTF-8 sequences."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {b: chr(b) for b in printable}
    char_of.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in char_of)})
    byte_of = {c: b for b, c in char_of.items()}
    return {bytes(byte_of[c] for c in token): [token_id] for token, token_id in tokenizer.get_vocab().items()
            if token not in SPECIAL_TOKENS}


@dataclasses.dataclass
class BenchTokenizer:
    """The trained tokenizer with what the contenders take from it."""

    directory: pathlib.Path
    backend: tokenizers.Tokenizer
    vocab_size: int
    eos_id: int

    @classmethod
    def load(cls, directory: pathlib.Path) -> BenchTokenizer:
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(directory, backend, backend.get_vocab_size(), backend.token_to_id(EOS))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


# ---- the contenders: one class each, the same four verbs ------------------------------------------------------
class LLGuidance:
    """llguidance as `worker/engine/grammar.py` drives it: a template matcher per grammar, a copy per sequence."""

    package = "llguidance"
    modules = ("llguidance",)

    def __init__(self, tok: BenchTokenizer) -> None:
        self._tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=[tok.eos_id])

    def compile_json(self, schema: dict) -> llguidance.LLMatcher:
        return self._matcher(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS))

    def compile_regex(self, regex: str) -> llguidance.LLMatcher:
        return self._matcher(llguidance.LLMatcher.grammar_from_regex(regex))

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def sequence(self, compiled: llguidance.LLMatcher) -> Sequence:
        matcher = compiled.deep_copy()
        return Sequence(lambda mask: matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4),
                        matcher.consume_token)


class XGrammar:
    """xgrammar: a GrammarCompiler per tokenizer (its cache never hits here: every schema is new), a
    GrammarMatcher per sequence."""

    package = "xgrammar"
    modules = ("xgrammar", "transformers")

    def __init__(self, tok: BenchTokenizer) -> None:
        transformers = importlib.import_module("transformers")  # only xgrammar reads the tokenizer through it
        xgr = self._xgr = importlib.import_module("xgrammar")
        hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok.directory))
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id])
        self._compiler = xgr.GrammarCompiler(info, max_threads=len(os.sched_getaffinity(0)))

    def compile_json(self, schema: dict):
        return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def compile_regex(self, regex: str):
        return self._compiler.compile_regex(regex)

    def sequence(self, compiled) -> Sequence:
        matcher = self._xgr.GrammarMatcher(compiled)
        return Sequence(matcher.fill_next_token_bitmask, matcher.accept_token)


class OutlinesCore:
    """outlines-core: a schema becomes a regex, the regex an Index (a token-level automaton built ahead of
    time, over the whole vocabulary), and a Guide walks it per sequence."""

    package = "outlines-core"
    modules = ("outlines_core",)

    def __init__(self, tok: BenchTokenizer) -> None:
        self._oc = importlib.import_module("outlines_core")
        self._vocabulary = self._oc.Vocabulary(tok.eos_id, token_bytes(tok.backend))

    def compile_json(self, schema: dict):
        # The whitespace between items may be one space at most: the document's ", " and ": " fit it.
        regex = self._oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?")
        return self._oc.Index(regex, self._vocabulary)

    def compile_regex(self, regex: str):
        return self._oc.Index(regex, self._vocabulary)

    def sequence(self, compiled) -> Sequence:
        guide = self._oc.Guide(compiled)
        return Sequence(lambda mask: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4), self._advancer(guide))

    @staticmethod
    def _advancer(guide):
        def accept(token: int) -> bool:
            try:
                guide.advance(token, return_tokens=False)
            except ValueError:  # outlines-core refuses a token by raising; the others return False
                return False
            return True
        return accept


CONTENDERS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


@dataclasses.dataclass
class Sequence:
    """One sequence's view of a compiled grammar: fill the next-token bitmask, accept a token."""

    fill_mask: Callable[[torch.Tensor], object]  # writes the bitmask [1, ceil(V / 32)] int32 in place
    accept: Callable[[int], bool]  # False when the matcher refuses the token


# ---- the measurements ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Walk:
    """A document fed token by token (EOS last): the time of each mask, and where it was refused, if it was."""

    mask_us: list[float]
    refused_at: int | None = None  # index of the first token the mask excluded or the matcher refused

    @property
    def accepted(self) -> bool:
        return self.refused_at is None


def walk(library, compiled, tokens: list[int], vocab_size: int) -> Walk:
    """Mask, check the next token is allowed, accept it; only the mask is timed. The last token (EOS) is only
    checked against its mask: a sequence ends there, and outlines-core's Guide has no transition on EOS."""
    sequence = library.sequence(compiled)
    mask = torch.zeros((1, -(-vocab_size // 32)), dtype=torch.int32)
    words = mask.numpy()[0]  # the same memory, read without torch's per-index overhead
    times = []
    for i, token in enumerate(tokens):
        start = time.perf_counter()
        sequence.fill_mask(mask)
        times.append((time.perf_counter() - start) * 1e6)
        allowed = (int(words[token >> 5]) >> (token & 31)) & 1
        if not allowed or (i < len(tokens) - 1 and not sequence.accept(token)):
            return Walk(times, refused_at=i)
    return Walk(times)


def cold_compile(compile_one, sources: list, first_mask) -> tuple[float, float]:
    """Median ms to compile each of `sources` (all unseen), and median ms to compile plus fill the first mask."""
    compile_ms, first_ms = [], []
    for source in sources:
        start = time.perf_counter()
        compiled = compile_one(source)
        compile_ms.append((time.perf_counter() - start) * 1e3)
        first_mask(compiled)
        first_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(compile_ms), statistics.median(first_ms)


def renamed(schema: dict, old: str, new: str) -> dict:
    """`schema` with top-level property `old` called `new`: a schema no cache has seen."""
    copy = json.loads(json.dumps(schema))
    copy["properties"] = {new if k == old else k: v for k, v in copy["properties"].items()}
    copy["required"] = [new if k == old else k for k in copy["required"]]
    return copy


@dataclasses.dataclass
class CaseResult:
    """One library on one case (the JSON schema or the regex)."""

    compiled: bool
    error: str = ""
    compile_ms: float = float("nan")
    first_mask_ms: float = float("nan")
    mask_mean_us: float = float("nan")
    mask_median_us: float = float("nan")
    mask_p99_us: float = float("nan")
    walk: str = ""
    enforced: str = ""


def measure_case(library, tok: BenchTokenizer, compile_one, cold_sources: list, source, text: str,
                 walks: int) -> CaseResult:
    """Compile `source`, walk `text` `walks` times on fresh sequences, and time cold compiles of `cold_sources`."""
    tokens = [*tok.encode(text), tok.eos_id]
    try:
        compiled = compile_one(source)
    except Exception as exc:  # any library's refusal of the grammar is a result to report, not a crash
        return CaseResult(compiled=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    runs = [walk(library, compiled, tokens, tok.vocab_size) for _ in range(walks)]
    times = [t for run in runs for t in run.mask_us]
    refused = next((run.refused_at for run in runs if not run.accepted), None)
    verdict = "ok" if refused is None else f"REFUSED token {refused}/{len(tokens)}"
    compile_ms, first_ms = cold_compile(compile_one, cold_sources,
                                        lambda c: library.sequence(c).fill_mask(
                                            torch.zeros((1, -(-tok.vocab_size // 32)), dtype=torch.int32)))
    return CaseResult(True, compile_ms=compile_ms, first_mask_ms=first_ms, mask_mean_us=statistics.fmean(times),
                      mask_median_us=statistics.median(times),
                      mask_p99_us=float(np.percentile(times, 99)), walk=verdict)


def enforcement(library, tok: BenchTokenizer) -> str:
    """Which of PROBE_VIOLATIONS the library refuses (+) or lets through (-); '?' when the probe cannot run."""
    try:
        compiled = library.compile_json(PROBE_SCHEMA)
    except Exception as exc:  # reported in the column, like a refused schema
        return f"probe schema refused ({type(exc).__name__})"
    if not walk(library, compiled, [*tok.encode(json.dumps(PROBE_VALID)), tok.eos_id], tok.vocab_size).accepted:
        return "? (valid probe refused)"
    marks = []
    for feature, change in PROBE_VIOLATIONS.items():
        document = json.dumps({**PROBE_VALID, **change})
        result = walk(library, compiled, [*tok.encode(document), tok.eos_id], tok.vocab_size)
        marks.append(f"{feature}{'-' if result.accepted else '+'}")
    return " ".join(marks)


@dataclasses.dataclass
class Measured:
    """One library in one round: its tokenizer preparation and both cases."""

    prep_ms: float
    cases: dict[str, CaseResult]


def measure_contender(contender, tok: BenchTokenizer, schemas: int, walks: int, round_: int) -> Measured:
    """A fresh instance of `contender` (so no cache of an earlier round helps), prepared and measured."""
    begin = time.perf_counter()
    library = contender(tok)
    prep_ms = (time.perf_counter() - begin) * 1e3
    return Measured(prep_ms, measure_library(library, tok, schemas, walks, round_))


def measure_library(library, tok: BenchTokenizer, schemas: int, walks: int, round_: int) -> dict[str, CaseResult]:
    """Both cases for one library, and its enforcement probe on the JSON row; the cold sources are new each round."""
    cold_schemas = [renamed(INVOICE_SCHEMA, "number", f"number_{round_}_{i}") for i in range(schemas)]
    cold_regexes = [INVOICE_REGEX.replace("INV", f"N{round_}X{i}", 1) for i in range(schemas)]
    json_case = measure_case(library, tok, library.compile_json, cold_schemas, INVOICE_SCHEMA,
                             json.dumps(INVOICE), walks)
    json_case.enforced = enforcement(library, tok)
    regex_case = measure_case(library, tok, library.compile_regex, cold_regexes, INVOICE_REGEX, REGEX_TEXT, walks)
    return {"json": json_case, "regex": regex_case}


def best_of(rounds: list[Measured]) -> Measured:
    """Each figure's best (lowest) over the rounds; a refusal or a failed walk in any round is kept."""
    cases = {}
    for case in rounds[0].cases:
        runs = [r.cases[case] for r in rounds]
        failed = next((run for run in runs if not run.compiled), None)
        if failed is not None:
            cases[case] = failed
            continue
        figures = {f: min(getattr(run, f) for run in runs)
                   for f in ("compile_ms", "first_mask_ms", "mask_mean_us", "mask_median_us", "mask_p99_us")}
        walk_verdict = next((run.walk for run in runs if run.walk != "ok"), "ok")
        cases[case] = dataclasses.replace(runs[0], walk=walk_verdict, **figures)
    return Measured(min(r.prep_ms for r in rounds), cases)


# ---- the report ----------------------------------------------------------------------------------------------
def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def with_ratio(value: float, base: float, fmt: str) -> str:
    """`value` and its ratio to llguidance's `base`."""
    if value != value:  # NaN: not measured
        return "-"
    ratio = f" ({value / base:.1f}x)" if base == base and base > 0 else ""
    return f"{value:{fmt}}{ratio}"


def print_table(results: dict[str, Measured]) -> None:
    """One row per library and case, each figure with its ratio to llguidance's."""
    header = (f"{'case':<6} {'library':<14} {'version':<8} {'prep ms':>15} {'compile ms':>16} {'+1st mask ms':>16} "
              f"{'mask mean us':>16} {'median us':>15} {'p99 us':>16}  {'walk':<6} enforced (+) / ignored (-)")
    print(header)
    print("-" * len(header))
    for case in ("json", "regex"):
        base = results["llguidance"].cases[case]
        for name, measured in results.items():
            r = measured.cases[case]
            lead = f"{case:<6} {name:<14} {version_of(CONTENDERS[name].package):<8} " \
                   f"{with_ratio(measured.prep_ms, results['llguidance'].prep_ms, '.0f'):>15} "
            if not r.compiled:
                print(f"{lead}REFUSED: {r.error}")
                continue
            print(f"{lead}{with_ratio(r.compile_ms, base.compile_ms, '.2f'):>16} "
                  f"{with_ratio(r.first_mask_ms, base.first_mask_ms, '.2f'):>16} "
                  f"{with_ratio(r.mask_mean_us, base.mask_mean_us, '.1f'):>16} "
                  f"{with_ratio(r.mask_median_us, base.mask_median_us, '.1f'):>15} "
                  f"{with_ratio(r.mask_p99_us, base.mask_p99_us, '.1f'):>16}  {r.walk:<6} {r.enforced}")


def installed_contenders() -> dict[str, type]:
    """The contenders whose package is installed, imported (off any clock); a line for each one missing."""
    contenders = {}
    for name, contender in CONTENDERS.items():
        if version_of(contender.package) is None:
            print(f"{name}: not installed (pip install {contender.package}); skipped")
            continue
        for module in contender.modules:  # imported here: preparation is the tokenizer's work alone
            importlib.import_module(module)
        contenders[name] = contender
    return contenders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench" / "bpe-32k")
    parser.add_argument("--schemas", type=int, default=5, help="distinct unseen schemas (and regexes) per cold compile")
    parser.add_argument("--walks", type=int, default=30, help="walks of the document per library, fresh sequence each")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each figure keeps its best")
    args = parser.parse_args()
    start = time.perf_counter()
    tok = BenchTokenizer.load(build_tokenizer(args.workdir))
    print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, eos {tok.eos_id}, in {tok.directory} "
          f"(ready in {time.perf_counter() - start:.1f} s); document {len(tok.encode(json.dumps(INVOICE)))} tokens, "
          f"regex text {len(tok.encode(REGEX_TEXT))} tokens; {torch.get_num_threads()} threads")
    contenders = installed_contenders()
    # Contenders alternate and each figure keeps its best round: the machines are shared and noisy, and the
    # least disturbed run is the fairest figure for every side alike.
    rounds: dict[str, list[Measured]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, contender in contenders.items():
            rounds[name].append(measure_contender(contender, tok, args.schemas, args.walks, round_))
    print_table({name: best_of(runs) for name, runs in rounds.items()})
    print(f"ratios are to llguidance; best of {args.rounds} rounds; compile: median of {args.schemas} unseen schemas "
          f"(regexes); +1st mask: compile plus a fresh sequence's first mask (llguidance builds its lexer lazily); "
          f"masks: {args.walks} walks on one compiled grammar, a fresh sequence each, EOS last")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
