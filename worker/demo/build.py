"""Build the demo checkpoint: a tiny Mixtral MoE trained on the Python stdlib.

The checkpoint uses the exact Hugging Face Mixtral layout (`config.json`,
`model.safetensors`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), so every loader that
reads a real Mixtral directory reads this one. The training text is the
standard library's own `.py` files, which every Python install ships, so the
build needs no download:

    python -m moemesh.worker.demo.build [--out DIR] [--steps N] [--seconds S]

BOS convention (the same as Mixtral's): the tokenizer's post-processor
prepends `<s>` to every encoded sequence (`add_special_tokens=True`, the
default). The chat template writes `<s>` itself, so a rendered chat is encoded
with `add_special_tokens=False`. Training documents are `<s> file </s>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sysconfig
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, UNK]  # ids 0, 1, 2: the trainer assigns them first
MAX_CHECKPOINT_BYTES = 10 * 1024 * 1024
MAX_POSITIONS = 1024

# Top-level stdlib folders left out of the corpus: the test suite and GUI demos
# are large, repetitive and unlike ordinary library code; site-packages is not
# the stdlib at all and differs between machines.
EXCLUDED_TOP_LEVEL = {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "pydoc_data"}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "### {{ message['role'] }}:\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)

README = """\
# demo-moe

A tiny Mixtral-architecture Mixture-of-Experts language model for moemesh
demos and tests: {params:,} parameters, {layers} layers, {experts} experts
per layer with {top_k} active per token, a {vocab}-token byte-level BPE
vocabulary. Weights are bfloat16.

It was trained for {steps} steps (final training loss {loss:.3f}) on
{corpus_mb:.1f} MB of the Python {py} standard library's own `.py` files, so it
writes Python-looking text and nothing else of use. It is a fixture, not a
model to ask questions.

The files follow the Hugging Face Mixtral layout exactly
(`MixtralForCausalLM.from_pretrained` loads them). The tokenizer prepends
`<s>` to every encoded sequence; the chat template writes `<s>` itself, so
encode a rendered chat with `add_special_tokens=False`.

Rebuild (about six minutes on one CPU thread):

    python -m moemesh.worker.demo.build              # into worker/demo/demo-moe/
    python -m moemesh.worker.demo.build --out DIR    # anywhere else

Training is seeded; with `--steps N` (and a `--seconds` large enough) the
result depends only on N and the Python version whose stdlib is read.
"""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What to build and for how long; `main()` fills it from the command line."""

    out: pathlib.Path
    steps: int = 100_000
    seconds: float = 360.0
    corpus_bytes: int = 4_000_000
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    peak_lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "corpus_bytes", "vocab_size", "seq_len", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seconds <= 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.seq_len >= MAX_POSITIONS:
            raise ValueError(f"seq_len must be below {MAX_POSITIONS}, got {self.seq_len}")


# ---------------------------------------------------------------- corpus


def stdlib_source_files() -> list[pathlib.Path]:
    """Every eligible stdlib `.py` file, sorted by path so the order is stable."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in EXCLUDED_TOP_LEVEL or "tests" in parts:
            continue
        files.append(path)
    return files


def read_corpus(max_bytes: int) -> list[str]:
    """About `max_bytes` of stdlib source, one string per file.

    Takes every k-th file of the sorted list rather than a prefix, so the
    sample spans the whole stdlib instead of the packages starting with "a".
    """
    files = stdlib_source_files()
    total = sum(path.stat().st_size for path in files)
    stride = max(1, math.ceil(total / max_bytes))
    texts, size = [], 0
    for path in files[::stride]:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    return texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) that prepends `<s>` on encode."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: pathlib.Path) -> None:
    """Write tokenizer.json and the two JSON files transformers reads beside it."""
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", special)


def tokenize_corpus(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one id stream, each `<s> ... </s>`.  # [T]"""
    eos_id = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)  # starts with <s> (post-processor)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- model


def mixtral_config(tokenizer: Tokenizer) -> MixtralConfig:
    """The demo architecture: ~2.4M parameters, 4 experts, top-2 routing."""
    return MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        tie_word_embeddings=False,
    )


def build_model(config: MixtralConfig, seed: int) -> MixtralForCausalLM:
    """A freshly initialised model; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


# ---------------------------------------------------------------- training


def sample_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random contiguous windows of the token stream.  # [B, S]"""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)  # [B]
    offsets = torch.arange(seq_len)  # [S]
    return tokens[starts[:, None] + offsets[None, :]]


def learning_rate(progress: float, step: int, options: BuildOptions) -> float:
    """Linear warmup, then cosine decay to 10% of peak as progress goes 0 -> 1.

    Progress is measured in steps or wall time, whichever limit is nearer, so
    a time-limited run still ends its schedule at a low rate.
    """
    if step < options.warmup_steps:
        return options.peak_lr * (step + 1) / options.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return options.peak_lr * (0.1 + 0.9 * cosine)


def train_step(model: MixtralForCausalLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One AdamW step on next-token loss plus the router's load-balancing loss."""
    # output_router_logits adds Mixtral's auxiliary loss, which keeps all four
    # experts in use; without it a model this small tends to collapse onto one.
    # labels == input_ids: the model shifts them by one position itself.
    output = model(input_ids=batch, labels=batch, output_router_logits=True)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    # The reported loss is the language-model part only, comparable across runs.
    return (output.loss - model.config.router_aux_loss_coef * output.aux_loss).item()


def train(model: MixtralForCausalLM, tokens: torch.Tensor, options: BuildOptions) -> tuple[int, float]:
    """Train until the step or time limit; return (steps taken, recent mean loss)."""
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    started, recent, step = time.monotonic(), [], 0
    while step < options.steps:
        elapsed = time.monotonic() - started
        if elapsed >= options.seconds:
            break
        progress = max(step / options.steps, elapsed / options.seconds)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, step, options)
        batch = sample_windows(tokens, options.batch_size, options.seq_len, generator)
        recent = (recent + [train_step(model, optimizer, batch)])[-options.log_every :]
        step += 1
        if step % options.log_every == 0:
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.3f}  {elapsed:6.0f}s", flush=True)
    model.eval()
    return step, sum(recent) / max(len(recent), 1)


# ---------------------------------------------------------------- output


def save_model(model: MixtralForCausalLM, out: pathlib.Path) -> None:
    """config.json + model.safetensors + generation_config.json, in bfloat16."""
    config = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id,  # no pad token; batching pads with </s>
        # Sampling defaults for requests that set none: greedy decoding of a
        # model this small falls into loops, sampling reads like its corpus.
        do_sample=True,
        temperature=0.7,
        top_k=50,
    )
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    add_legacy_rope_theta(out / "config.json", config.rope_parameters["rope_theta"])


def add_legacy_rope_theta(config_path: pathlib.Path, rope_theta: float) -> None:
    """Also write `rope_theta` at the top level of config.json.

    transformers 5 saves it only inside `rope_parameters`; transformers 4.x
    and hand-written loaders read the top-level key that published Mixtral
    checkpoints carry. transformers 5 reads a file with both.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["rope_theta"] = rope_theta
    write_json(config_path, config)


def write_readme(out: pathlib.Path, model: MixtralForCausalLM, steps: int, loss: float, corpus_bytes: int) -> None:
    """A README that says what the checkpoint is and how to rebuild it."""
    config = model.config
    text = README.format(
        params=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        vocab=config.vocab_size,
        steps=steps,
        loss=loss,
        corpus_mb=corpus_bytes / 1e6,
        py=sysconfig.get_python_version(),
    )
    (out / "README.md").write_text(text, encoding="utf-8")


def write_json(path: pathlib.Path, data: dict) -> None:
    """Pretty JSON with a trailing newline, as transformers writes its own."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def directory_bytes(path: pathlib.Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- entry point


def build(options: BuildOptions) -> None:
    """Run every step: corpus, tokenizer, model, training, save, size check."""
    options.out.mkdir(parents=True, exist_ok=True)
    texts = read_corpus(options.corpus_bytes)
    corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tokenizer = train_tokenizer(texts, options.vocab_size)
    save_tokenizer(tokenizer, options.out)
    tokens = tokenize_corpus(tokenizer, texts)
    print(f"corpus: {len(texts)} files, {corpus_bytes / 1e6:.1f} MB, {tokens.numel():,} tokens", flush=True)

    model = build_model(mixtral_config(tokenizer), options.seed)
    steps, loss = train(model, tokens, options)
    save_model(model, options.out)
    write_readme(options.out, model, steps, loss, corpus_bytes)

    size = directory_bytes(options.out)
    assert size <= MAX_CHECKPOINT_BYTES, f"{options.out} is {size} bytes, over the {MAX_CHECKPOINT_BYTES} limit"
    print(f"saved {options.out} ({size / 1e6:.2f} MB) after {steps} steps, loss {loss:.3f}")


def parse_options(argv: list[str] | None) -> BuildOptions:
    """Command-line flags -> BuildOptions."""
    default_out = pathlib.Path(__file__).resolve().parent / "demo-moe"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=default_out, help="output directory")
    parser.add_argument("--steps", type=int, default=BuildOptions.steps, help="most training steps")
    parser.add_argument("--seconds", type=float, default=BuildOptions.seconds, help="most training wall time")
    parser.add_argument("--seed", type=int, default=BuildOptions.seed)
    args = parser.parse_args(argv)
    return BuildOptions(out=args.out, steps=args.steps, seconds=args.seconds, seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    """Entry point for `python -m moemesh.worker.demo.build`."""
    # One thread: the result should not depend on the machine's core count,
    # and the build should not crowd out everything else on a shared box.
    torch.set_num_threads(1)
    build(parse_options(argv))


if __name__ == "__main__":
    main()
