"""Tiny random checkpoints and tokenizers, built locally for tests (no model hub).

`build_tiny_mixtral` writes a Hugging Face checkpoint directory that looks
like a published Mixtral one: config.json, generation_config.json, safetensors
weights (sharded on request), tokenizer.json and tokenizer_config.json with a
chat template. `build_tiny_qwen2_moe` and `build_tiny_qwen3_moe` do the same
for the Qwen MoE families.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: Mixtral's unk, bos, eos
TOKENIZER_VOCAB_SIZE = 512

# A Mistral-instruct style template, kept small.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token
to a few experts, and the router learns which expert is best for which token.
Enterprise systems call the service for streaming text generation and for embeddings.
Operators run it on one laptop, on a GPU server, or across a cluster of machines.
The scheduler admits requests, batches them, and picks a replica for each batch.
Workers keep a cache of keys and values, sample tokens, and stream text back.
Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e na\u00efve r\u00e9sum\u00e9 d\u00e9j\u00e0 vu.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159.
def forward(self, x): return self.w2(silu(self.w1(x)) * self.w3(x))
"""


def corpus_lines(repeats: int = 20) -> list[str]:
    """The training text, repeated so that BPE finds enough merges."""
    return CORPUS.splitlines() * repeats


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TOKENIZER_VOCAB_SIZE, *, bos: bool = True) -> Path:
    """Train a byte-level BPE on the local corpus; write tokenizer.json and tokenizer_config.json.

    With `bos` the post-processor puts `<s>` first, as Llama's and Mistral's tokenizer.json do; without it
    the tokenizer adds nothing, as Qwen's.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


# What every tiny checkpoint shares: the test tokenizer's vocabulary and special ids, 4 heads of 16 over 2 KV
# heads, 256 positions, an untied head.
TINY_SHAPE = dict(vocab_size=TOKENIZER_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)


def tiny_mixtral_config(**overrides):
    """A transformers MixtralConfig small enough for CPU tests."""
    from transformers import MixtralConfig

    return MixtralConfig(**(TINY_SHAPE | dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                              rms_norm_eps=1e-5) | overrides))


def redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights so that logits are clearly peaked.

    The default init (std 0.02) gives nearly flat logits whose argmax flips
    with any change of float summation order, which would hide real bugs.
    Matrices get std ~1/sqrt(fan_in) (router a bit more, to make routing
    decisive), embeddings std 1, norm weights around 1.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif name.endswith("gate.weight"):
                param.copy_(noise * 2.0 / math.sqrt(param.shape[-1]))
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def tiny_qwen2_moe_config(**overrides):
    """A transformers Qwen2MoeConfig small enough for CPU tests: a shared expert, and layer 1 dense."""
    from transformers import Qwen2MoeConfig

    # intermediate_size is the dense layer's MLP
    return Qwen2MoeConfig(**(TINY_SHAPE | dict(moe_intermediate_size=32, shared_expert_intermediate_size=96,
                                               num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                               mlp_only_layers=[1], rms_norm_eps=1e-6) | overrides))


def tiny_qwen3_moe_config(**overrides):
    """A transformers Qwen3MoeConfig small enough for CPU tests; head_dim is not hidden_size / heads."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**(TINY_SHAPE | dict(moe_intermediate_size=32, num_hidden_layers=2, head_dim=32,
                                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                               rms_norm_eps=1e-6) | overrides))


def build_tiny(architecture: str, config, out_dir: str | Path, seed: int = 0, *,
               max_shard_size: str | None = None, save_dtype: torch.dtype = torch.float32) -> Path:
    """Draw a `transformers` model of `architecture` from `config` with peaked weights, save it as transformers
    does (sharded on request, in `save_dtype`), add the tokenizer; return the directory."""
    import transformers

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    redraw_weights(model, seed)
    model.to(save_dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    build_tiny_tokenizer(out_dir)
    return out_dir


def build_tiny_mixtral(out_dir: str | Path, seed: int = 0, *, max_shard_size: str | None = None,
                       save_dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny random Mixtral checkpoint (config `overrides` apply) with a tokenizer; its dir."""
    return build_tiny("MixtralForCausalLM", tiny_mixtral_config(**overrides), out_dir, seed,
                      max_shard_size=max_shard_size, save_dtype=save_dtype)


def build_tiny_qwen2_moe(out_dir: str | Path, seed: int = 0, *, max_shard_size: str | None = None,
                         save_dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny random Qwen2-MoE checkpoint (config `overrides` apply) with a tokenizer; its dir."""
    return build_tiny("Qwen2MoeForCausalLM", tiny_qwen2_moe_config(**overrides), out_dir, seed,
                      max_shard_size=max_shard_size, save_dtype=save_dtype)


def build_tiny_qwen3_moe(out_dir: str | Path, seed: int = 0, *, max_shard_size: str | None = None,
                         save_dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny random Qwen3-MoE checkpoint (config `overrides` apply) with a tokenizer; its dir."""
    return build_tiny("Qwen3MoeForCausalLM", tiny_qwen3_moe_config(**overrides), out_dir, seed,
                      max_shard_size=max_shard_size, save_dtype=save_dtype)


@dataclass(frozen=True)
class Family:
    """One model family under test: how to build its tiny checkpoint and its transformers class."""

    name: str
    build: Callable[..., Path]
    architecture: str

    def reference(self, ckpt_dir, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """transformers' model of this family, loaded from `ckpt_dir` in `dtype` on `device`."""
        import transformers

        return getattr(transformers, self.architecture).from_pretrained(ckpt_dir, dtype=dtype).to(device).eval()


FAMILIES = {
    "mixtral": Family("mixtral", build_tiny_mixtral, "MixtralForCausalLM"),
    "qwen2_moe": Family("qwen2_moe", build_tiny_qwen2_moe, "Qwen2MoeForCausalLM"),
    "qwen3_moe": Family("qwen3_moe", build_tiny_qwen3_moe, "Qwen3MoeForCausalLM"),
}


# A Hermes/Qwen-style template that renders tools: their JSON in a system block, an assistant's calls as
# <tool_call> blocks (arguments as JSON text or an object), a tool's answer as a <tool_response> block.
TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n# Tools\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a function with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'tool' %}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% else %}{{ message['content'] or '' }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}}\n</tool_call>{% endfor %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tools_mixtral(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Mixtral checkpoint whose chat template renders tools (TOOLS_CHAT_TEMPLATE), with 2,048
    positions unless `overrides` say otherwise (tool definitions make long prompts); its dir."""
    out_dir = build_tiny_mixtral(out_dir, seed, **({"max_position_embeddings": 2048} | overrides))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOLS_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir
