"""Tokenization follows the checkpoint's own tokenizer configuration, exactly as `transformers` does.

For the three families, with tokenizers whose post-processor puts BOS first (Llama and Mistral layouts) and
with tokenizers that add nothing (Qwen's), and whatever `add_bos_token` / `add_eos_token` say in
tokenizer_config.json, `Tokenizer.encode` gives the ids `AutoTokenizer.from_pretrained(dir)(text)` gives; and
greedy output through the mesh's `/v1/completions` equals `transformers` `generate` on the same prompt.
"""

from __future__ import annotations

import json
import pathlib
import urllib.request

import pytest
import torch
from transformers import AutoTokenizer

from moemesh.local import start_mesh, stop_mesh
from moemesh.worker.engine.tokenizer import Tokenizer
from tests.support.checkpoints import FAMILIES, build_tiny_tokenizer

TEXTS = ["hello world", "The scheduler admits requests", "Café crème brûlée, déjà vu!", "<s>a BOS in the text",
         "  spaces\tand\nnewlines  ", "", "def forward(self, x): return x"]


def with_tokenizer(ckpt: pathlib.Path, *, bos: bool, config: dict | None = None) -> pathlib.Path:
    """`ckpt` with its tokenizer replaced: BOS in the post-processor or not, `config` merged into
    tokenizer_config.json."""
    build_tiny_tokenizer(ckpt, bos=bos)
    config_path = ckpt / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | (config or {})))
    return ckpt


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_ckpt(request, tmp_path_factory) -> pathlib.Path:
    return FAMILIES[request.param].build(tmp_path_factory.mktemp(request.param), seed=3)


@pytest.mark.parametrize("bos", [True, False], ids=["bos-post-processor", "no-post-processor"])
@pytest.mark.parametrize("config", [{}, {"add_bos_token": True}, {"add_bos_token": False},
                                    {"add_bos_token": True, "add_eos_token": True}],
                         ids=["plain", "add_bos_token", "no_add_bos_token", "add_eos_token"])
def test_encode_gives_the_ids_transformers_gives(family_ckpt, bos, config):
    ckpt = with_tokenizer(family_ckpt, bos=bos, config=config)
    ours, theirs = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], f"{text!r} with {config}, bos={bos}"
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    first = ours.encode("hello")[0]
    assert (first == ours.bos_token_id) is bos, "BOS comes from the post-processor alone"


@pytest.fixture(scope="module", params=[("mixtral", True), ("qwen2_moe", False)], ids=["bos", "no-bos"])
def served(request, tmp_path_factory):
    """A mesh serving a checkpoint whose tokenizer adds BOS (Mixtral's layout) or adds nothing (Qwen's)."""
    name, bos = request.param
    ckpt = with_tokenizer(FAMILIES[name].build(tmp_path_factory.mktemp(f"served-{name}"), seed=4), bos=bos)
    mesh = start_mesh(tmp_path_factory.mktemp(f"mesh-{name}"), "--no-embeddings", "--model", str(ckpt))
    yield FAMILIES[name], ckpt, mesh
    stop_mesh(mesh)


def test_greedy_completions_equal_transformers_generate(served):
    family, ckpt, mesh = served
    hf_tokenizer = AutoTokenizer.from_pretrained(ckpt)
    reference = family.reference(ckpt)
    for prompt in ("The router picks", "Numbers: 0 1 2"):
        ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                     pad_token_id=hf_tokenizer.eos_token_id)
        expected = hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        body = json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://{mesh.http}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=180) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["prompt_tokens"] == ids.shape[1], "the prompt is tokenized as transformers does"
        assert answer["choices"][0]["text"] == expected, f"{prompt!r}: greedy output differs from transformers"
