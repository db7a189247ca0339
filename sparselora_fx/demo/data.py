"""The demo's data: generated arithmetic word problems (Alpaca format) and a char tokenizer.

Why generated, not downloaded: the demo must run offline, seeded, in minutes. The same seed
gives the same problems on every machine, so the two fine-tuning runs (dense LoRA and
SparseLoRA) and any rerun see identical batches. Loss is taken on the answer tokens only:
prompt and padding positions get the label -100 that ``CrossEntropyLoss`` ignores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import SparseLoRAError

IGNORE_INDEX = -100

#: How an Alpaca record becomes a prompt; the response (output + EOS) follows it.
PROMPT_TEMPLATE = "{instruction}\n{input}\nAnswer: "
PROMPT_TEMPLATE_NO_INPUT = "{instruction}\nAnswer: "

_NAMES = ("Ann", "Ben", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kim", "Lu", "Max")
_THINGS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps")


class DemoDataError(SparseLoRAError, ValueError):
    """A demo data file or record that cannot be used."""


def _problem(rng: random.Random) -> dict[str, str]:
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        text, expr, ans = f"{name} has {a} {thing} and gets {b} more. How many now?", f"{a}+{b}", a + b
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        text, expr, ans = f"{name} has {a} {thing} and gives {b} to {other}. How many are left?", f"{a}-{b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text, expr, ans = f"{name} buys {a} bags of {b} {thing}. How many {thing}?", f"{a}*{b}", a * b
    else:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        a = b * q
        text, expr, ans = f"{name} shares {a} {thing} among {b} friends. How many each?", f"{a}/{b}", q
    return {"instruction": "Solve the word problem.", "input": text, "output": f"{expr}={ans}. The answer is {ans}."}


def generate_problems(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` arithmetic word problems as Alpaca records ``{instruction, input, output}``.

    Why: a small instruction set with a checkable answer that needs no download; the same
    ``(n, seed)`` always gives the same list (a private ``random.Random``, no global state).
    """
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def demo_splits(n_train: int = 500, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / eval lists from one seeded stream (eval drawn after train)."""
    problems = generate_problems(n_train + n_eval, seed)
    return problems[:n_train], problems[n_train:]


def load_alpaca_json(path: str | Path) -> list[dict[str, str]]:
    """Read an Alpaca-style JSON list (each record: instruction, optional input, output).

    Why: ``--data`` lets users try their own set; errors name the record and the missing key.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoDataError(f"{p}: data file not found; pass an existing Alpaca-style JSON file to --data.") from None
    except IsADirectoryError:
        raise DemoDataError(f"{p}: a folder, not a data file; pass an Alpaca-style JSON file to --data.") from None
    except UnicodeDecodeError:
        raise DemoDataError(f"{p}: not UTF-8 text (a binary file?); pass an Alpaca-style JSON file "
                            "to --data.") from None
    except OSError as exc:
        raise DemoDataError(f"{p}: cannot read the data file ({exc.strerror or exc}); pass a readable "
                            "Alpaca-style JSON file to --data.") from None
    except json.JSONDecodeError as exc:
        raise DemoDataError(f"{p}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}; --data takes a JSON list "
                            "of {instruction, input, output} records.") from None
    if not isinstance(data, list) or not data:
        raise DemoDataError(f"{p}: expected a non-empty JSON list of {{instruction, input, output}} records.")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise DemoDataError(f"{p}: record {i} needs string keys 'instruction' and 'output' "
                                "(and optionally 'input'), e.g. the Alpaca format.")
    return [{"instruction": str(r["instruction"]), "input": str(r.get("input", "")), "output": str(r["output"])}
            for r in data]


def prompt_of(record: dict[str, str]) -> str:
    """The prompt text of a record (what the model reads, never trained on)."""
    template = PROMPT_TEMPLATE if record.get("input") else PROMPT_TEMPLATE_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


class CharTokenizer:
    """A byte-free character tokenizer over printable ASCII plus newline, with PAD/BOS/EOS/UNK.

    Why: the demo ships its vocabulary (no download); ~100 ids keep the LM head small. Any
    character outside the alphabet maps to UNK.
    """

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self) -> None:
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self._ids = {ch: i + 4 for i, ch in enumerate(chars)}
        self._chars = {i: ch for ch, i in self._ids.items()}
        self.vocab_size = 4 + len(chars)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens added)."""
        return [self._ids.get(ch, self.unk_token_id) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return "".join(self._chars.get(int(i), "") for i in ids)


def _encode_fn(tokenizer: Any):
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(record: dict[str, str], tokenizer: Any, seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record, right-padded to ``seq_len``.

    Why: the loss must see the answer only. Layout: BOS, prompt, output, EOS, PAD...; labels
    copy the ids on output+EOS and are -100 on BOS, prompt and PAD (HF models shift labels
    themselves). Too long: the prompt is cut from the left so the answer survives.
    """
    encode = _encode_fn(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    head = [bos] if bos is not None else []
    prompt = encode(prompt_of(record))
    answer = encode(record["output"]) + ([eos] if eos is not None else [])
    room = seq_len - len(head) - len(answer)
    if room < 1:
        answer = answer[: max(1, seq_len - len(head) - 1)]
        room = seq_len - len(head) - len(answer)
    prompt = prompt[-room:] if len(prompt) > room else prompt
    ids = head + prompt + answer
    labels = [IGNORE_INDEX] * (len(head) + len(prompt)) + answer
    fill = seq_len - len(ids)
    return ids + [pad] * fill, labels + [IGNORE_INDEX] * fill


def encode_dataset(records: Sequence[dict[str, str]], tokenizer: Any, seq_len: int) -> dict[str, torch.Tensor]:
    """All records as ``input_ids`` and ``labels`` tensors of shape ``[N, seq_len]``."""
    pairs = [encode_example(r, tokenizer, seq_len) for r in records]
    return {"input_ids": torch.tensor([p[0] for p in pairs], dtype=torch.long),
            "labels": torch.tensor([p[1] for p in pairs], dtype=torch.long)}


@dataclass
class BatchStream:
    """Seeded, endless shuffled batches of fixed shape (static shapes: one compile, no recompiles)."""

    data: dict[str, torch.Tensor]
    batch_size: int
    seed: int = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = self.data["input_ids"].shape[0]
        if n < self.batch_size:
            raise DemoDataError(f"the data set has {n} examples, fewer than the batch size {self.batch_size}; "
                                "lower --batch or give more data.")
        g = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(n, generator=g)
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                idx = order[start:start + self.batch_size]
                yield {k: v[idx] for k, v in self.data.items()}
