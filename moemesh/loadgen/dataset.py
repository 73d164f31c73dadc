"""The benchmark's prompts: seeded synthetic text of a given token count, or the lines of a prompt file.

Synthetic prompts are words drawn from a fixed list. With a tokenizer (a checkpoint directory's `tokenizer.json`)
every prompt has exactly the requested number of tokens as that tokenizer counts them, special tokens its
post-processor adds (BOS) included, which is how servers count a raw-text prompt. Without one the length is
approximated from words and the report gives the mean the server counted.

Prompt `i` of a stream depends only on the seed, the stream and `i`: a run's targets get prompts of the same
lengths, each target its own stream (see `runner.run_bench`); a prompt file's lines are the same for all.
A shared prefix (a fraction of each prompt's tokens, the same text for all) exercises prefix caching.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import string
from dataclasses import dataclass
from typing import Protocol

import tokenizers

from moemesh.loadgen.config import DatasetConfig

WORDS_PER_TOKEN = 0.75  # the usual rule of thumb for English text, used when there is no tokenizer
MAX_FIT_ROUNDS = 64  # re-encodings allowed to settle one prompt on its exact token count
MAX_SINGLE_TOKEN_WORDS = 256
WORDS = tuple("""
account action address agent amount answer balance bank batch bill board budget business buyer cache card case
cash change channel charge check claim client code company contract cost count credit customer data date day deal
debit delivery demand detail device discount document due entry error event expense export field file filter
finance flow form freight fund goods group growth import income index invoice issue item journal key label ledger
level limit line list loan lot margin market member message method model month name network note number offer
office order owner package page part partner payment period plan policy price process product profit project
purchase quantity quote rate receipt record refund region report request reserve result return revenue review
risk rule sale schedule service session share shipment side source space staff state status stock store supplier
supply system table task tax team term time total trade transfer type unit update user value vendor view volume
warehouse week weight work year zone the of and to in for on with by from at as is are was will be this that
""".split())


@dataclass(frozen=True)
class Prompt:
    """One request's prompt text and its token count (None when no tokenizer counted it)."""

    text: str
    tokens: int | None = None


class Dataset(Protocol):
    """An endless, deterministic sequence of prompts."""

    def prompt(self, index: int, stream: str = "bench") -> Prompt:
        """Prompt number `index` of `stream` (`warmup` prompts never repeat measured ones)."""
        ...


# ---- token counting ------------------------------------------------------------------------------------------------
class TokenCounter:
    """Counts tokens as a checkpoint's `tokenizer.json` does, and knows the words that are one token each."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._word_costs: dict[str, int] = {}
        self.unit_words = self._single_token_words(" ")  # one token each after a space
        self.lead_words = self._single_token_words("")  # one token each at the start of a prompt

    @classmethod
    def from_dir(cls, directory: pathlib.Path) -> TokenCounter:
        """The counter of a checkpoint directory; ValueError naming the flag when it has no tokenizer.json."""
        path = pathlib.Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"--tokenizer: {str(directory)!r} has no tokenizer.json")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def count(self, text: str) -> int:
        """Tokens of a whole prompt, with the special tokens the tokenizer's post-processor adds."""
        return len(self.tokenizer.encode(text).ids)

    def word_cost(self, word: str) -> int:
        """Tokens that ` word` adds after another word (pre-tokenizers split at the space, so costs add up)."""
        if word not in self._word_costs:
            self._word_costs[word] = len(self.tokenizer.encode(" " + word, add_special_tokens=False).ids)
        return self._word_costs[word]

    def _single_token_words(self, lead: str) -> tuple[str, ...]:
        """Words that are one token after `lead`: from the word list, else whole-word entries of the vocabulary,
        else single letters."""
        def single(word: str) -> bool:
            return len(self.tokenizer.encode(lead + word, add_special_tokens=False).ids) == 1

        found = tuple(w for w in WORDS if single(w))
        if not found:
            decoded = (self.tokenizer.decode([i]) for i in sorted(self.tokenizer.get_vocab().values()))
            whole = (text[len(lead):] for text in decoded if re.fullmatch(f"{lead}[A-Za-z]{{2,}}", text))
            found = tuple(w for w in whole if single(w))[:MAX_SINGLE_TOKEN_WORDS]
        found = found or tuple(c for c in string.ascii_lowercase if single(c))
        if not found:
            raise ValueError(f"--tokenizer: no word is a single token {'after a space' if lead else 'alone'}")
        return found


def fit_words(counter: TokenCounter, fixed: list[str], target: int, rng: random.Random) -> list[str]:
    """`fixed` followed by random words, `target` tokens in all; ValueError when no such text exists."""
    words = list(fixed) or [rng.choice(counter.lead_words)]
    estimate = counter.count(" ".join(words))
    while True:
        word = rng.choice(WORDS)
        if estimate + counter.word_cost(word) > target:
            break
        words.append(word)
        estimate += counter.word_cost(word)
    return _settle(counter, words, len(fixed), target, rng)


def _settle(counter: TokenCounter, words: list[str], fixed: int, target: int, rng: random.Random) -> list[str]:
    """Adjust the words after the first `fixed` until the text encodes to exactly `target` tokens."""
    for _ in range(MAX_FIT_ROUNDS):
        count = counter.count(" ".join(words))
        if count == target:
            return words
        if count < target:
            words.extend(rng.choice(counter.unit_words) for _ in range(max(target - count, 1)))
        elif len(words) > max(fixed, 1):
            words.pop()
        else:
            break
    raise ValueError(f"--prompt-tokens: this tokenizer cannot make a prompt of exactly {target} tokens "
                     f"(with a shared prefix of {fixed} words)")


# ---- datasets ------------------------------------------------------------------------------------------------------
class SyntheticPrompts:
    """Seeded prompts of words: `prompt_tokens` long, the first `shared_prefix_ratio` of them common to all."""

    def __init__(self, config: DatasetConfig, seed: int, counter: TokenCounter | None = None) -> None:
        self.config = config
        self.seed = seed
        self.counter = counter
        self.prefix = self._prefix_words()

    def prompt(self, index: int, stream: str = "bench") -> Prompt:
        rng = random.Random(f"{self.seed}/{stream}/{index}")
        if self.counter is None:
            words = self.prefix + [rng.choice(WORDS) for _ in range(self._word_count() - len(self.prefix))]
            return Prompt(" ".join(words))
        words = fit_words(self.counter, self.prefix, self.config.prompt_tokens, rng)
        return Prompt(" ".join(words), self.config.prompt_tokens)

    def _word_count(self) -> int:
        return max(1, round(self.config.prompt_tokens * WORDS_PER_TOKEN))

    def _prefix_words(self) -> list[str]:
        """The shared prefix: its fraction of the prompt's tokens (of its words, without a tokenizer)."""
        rng = random.Random(f"{self.seed}/prefix")
        if self.counter is None:
            return [rng.choice(WORDS) for _ in range(round(self._word_count() * self.config.shared_prefix_ratio))]
        target = round(self.config.prompt_tokens * self.config.shared_prefix_ratio)
        if target <= self.counter.count(""):  # no room for a word beside the special tokens
            return []
        return fit_words(self.counter, [], target, rng)


class FilePrompts:
    """The prompts of a file, in order, starting over at the end."""

    def __init__(self, texts: list[str], counter: TokenCounter | None = None) -> None:
        self.texts = texts
        self.counter = counter

    def prompt(self, index: int, stream: str = "bench") -> Prompt:
        # Warm-up prompts come from the end of the file, so the first measured ones are not already cached.
        position = index if stream.startswith("bench") else -1 - index
        text = self.texts[position % len(self.texts)]
        return Prompt(text, self.counter.count(text) if self.counter else None)


def read_prompt_file(path: pathlib.Path) -> list[str]:
    """One prompt per line, or JSONL objects with a "prompt" string; blank lines are skipped."""
    texts = []
    for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line).get("prompt")
            except json.JSONDecodeError as exc:
                raise ValueError(f"--prompt-file: line {number} is not valid JSON: {exc}") from None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"--prompt-file: line {number} has no non-empty \"prompt\" string")
            texts.append(prompt)
        else:
            texts.append(line)
    if not texts:
        raise ValueError(f"--prompt-file: {str(path)!r} holds no prompt")
    return texts


def build_dataset(config: DatasetConfig, seed: int) -> Dataset:
    """The run's prompts: the prompt file's when one is given, else synthetic ones."""
    counter = TokenCounter.from_dir(config.tokenizer_dir) if config.tokenizer_dir else None
    if config.prompt_file is not None:
        return FilePrompts(read_prompt_file(config.prompt_file), counter)
    return SyntheticPrompts(config, seed, counter)


class PreparedPrompts:
    """A dataset's prompts, built once and kept, so that no timed request waits for its prompt to be built."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.built: dict[tuple[str, int], Prompt] = {}

    def prepare(self, stream: str, first: int, count: int) -> None:
        """Build prompts `first` .. `first + count - 1` of `stream` now."""
        for index in range(first, first + count):
            self.prompt(index, stream)

    def prompt(self, index: int, stream: str = "bench") -> Prompt:
        key = (stream, index)
        if key not in self.built:
            self.built[key] = self.dataset.prompt(index, stream)
        return self.built[key]
