"""The toy task world: add up a list of expenses and answer in a fixed format.

A task is a short list of expense items with integer prices (in roubles)::

    Проанализируй список расходов и вычисли общую сумму:
    Хлеб: 55
    Молоко: 80
    Фрукты: 230
    Ответ верни в виде: "Итого: X рублей".

and its reference answer is ``Итого: 365 рублей.``

Everything here is pure Python and deterministic given a seed: the same (seed, split,
difficulty) always gives the same rows, on every machine and Python version (the random
streams are `random.Random` seeded with strings, which do not depend on PYTHONHASHSEED).

Held-out split
--------------
Train and eval sets never share a task. Two mechanisms:

* every split draws from its own seed stream (``alignkit-toy/tasks/<split>/<seed>``), and
* every possible task is assigned to exactly one split by a hash of its content (the sorted
  (name, value) pairs): a task whose hash falls in the eval bucket (1 in 8) is never emitted
  by a train generator, and an eval generator emits only such tasks. So no train set, for any
  seed or difficulty, shares a prompt (or even the same items in another order) with any eval
  set. Pretraining text is drawn from the train side too.

Within one call, the i-th row of every generator (sft / preference / prompts) with the same
(n, seed, split, difficulty) is built on the same task, so the sets line up row by row.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

ITEM_NAMES: tuple[str, ...] = (
    "Хлеб", "Молоко", "Фрукты", "Овощи", "Мясо", "Рыба", "Сыр", "Яйца", "Кофе", "Чай",
    "Сахар", "Крупы", "Макароны", "Масло", "Сок", "Вода", "Сладости", "Транспорт", "Такси",
    "Бензин", "Связь", "Интернет", "Аптека", "Кино", "Книги", "Одежда", "Обувь", "Кафе",
    "Обед", "Подарки", "Стрижка", "Парковка", "Бытовая химия",
)

INSTRUCTION = "Проанализируй список расходов и вычисли общую сумму:"
FORMAT_LINE = 'Ответ верни в виде: "Итого: X рублей".'


@dataclass(frozen=True)
class Difficulty:
    """How hard a task is: the number of items and the range of prices.

    Prices are multiples of `step` in [min_value, max_value] (both rounded onto the grid)."""

    min_items: int = 3
    max_items: int = 5
    min_value: int = 10
    max_value: int = 90
    step: int = 10

    def __post_init__(self) -> None:
        if not (1 <= self.min_items <= self.max_items <= len(ITEM_NAMES)):
            raise ValueError(f"need 1 <= min_items <= max_items <= {len(ITEM_NAMES)}, got {self}")
        if not (1 <= self.step and 0 <= self.min_value <= self.max_value):
            raise ValueError(f"need step >= 1 and 0 <= min_value <= max_value, got {self}")
        if self.values()[0] > self.values()[1]:
            raise ValueError(f"no multiple of step={self.step} in [{self.min_value}, {self.max_value}]")

    def values(self) -> tuple[int, int]:
        """(lowest, highest) price on the grid, as multiples of step."""
        lo = -(-self.min_value // self.step)
        hi = self.max_value // self.step
        return lo, hi


# Presets, calibrated on the default toy base model (docs/toy.md). After a 300-step SFT it
# gets the format right almost always and the total right on about half of the held-out
# "default" prompts (nearly all 2-item lists, fewer 3- and 4-item ones); "hard" adds prices
# ending in 5 (about a quarter right); "expert" is beyond it (room for bigger models).
DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(min_items=2, max_items=3, min_value=10, max_value=90, step=10),
    "default": Difficulty(min_items=3, max_items=5, min_value=10, max_value=90, step=10),
    "hard": Difficulty(min_items=2, max_items=4, min_value=5, max_value=95, step=5),
    "expert": Difficulty(min_items=3, max_items=5, min_value=10, max_value=990, step=5),
    # the calculator demo (docs/agents.md): 2-3 prices up to 300, beyond the tiny model's own sums
    "calc": Difficulty(min_items=2, max_items=3, min_value=10, max_value=300, step=1),
}


def get_difficulty(difficulty: str | Difficulty | None) -> Difficulty:
    """A preset name, a `Difficulty`, or None (the default preset)."""
    if difficulty is None:
        return DIFFICULTIES["default"]
    if isinstance(difficulty, Difficulty):
        return difficulty
    if isinstance(difficulty, dict):
        return Difficulty(**difficulty)
    if difficulty in DIFFICULTIES:
        return DIFFICULTIES[difficulty]
    raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")


def format_prompt(items: list[list]) -> str:
    lines = [INSTRUCTION] + [f"{name}: {value}" for name, value in items] + [FORMAT_LINE]
    return "\n".join(lines)


def format_answer(total: int) -> str:
    return f"Итого: {total} рублей."


def make_task(rng: random.Random, difficulty: str | Difficulty | None = None) -> dict:
    """One task: {prompt, answer, total, items=[[name, value], ...]} (no duplicate names)."""
    d = get_difficulty(difficulty)
    lo, hi = d.values()
    k = rng.randint(d.min_items, d.max_items)
    names = rng.sample(ITEM_NAMES, k)
    items = [[name, rng.randint(lo, hi) * d.step] for name in names]
    total = sum(v for _, v in items)
    return {"prompt": format_prompt(items), "answer": format_answer(total), "total": total, "items": items}


# ----------------------------------------------------------------------------------------------
# Train / eval partition
# ----------------------------------------------------------------------------------------------

SPLITS = ("train", "eval")
EVAL_BUCKETS = 8  # 1 task in 8 belongs to the eval side


def task_key(items: list[list]) -> str:
    """Order-free identity of a task: the same items in another order are the same task."""
    return "|".join(f"{n}={v}" for n, v in sorted((str(n), int(v)) for n, v in items))


def task_split(items: list[list]) -> str:
    """Which split a task belongs to, decided by a hash of its content ("train" or "eval")."""
    h = hashlib.sha256(task_key(items).encode("utf-8")).digest()
    return "eval" if h[0] % EVAL_BUCKETS == 0 else "train"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'eval'")
    return split


def _stream(stream: str, split: str, seed: int) -> random.Random:
    return random.Random(f"alignkit-toy/{stream}/{split}/{int(seed)}")


def iter_tasks(seed: int = 0, split: str = "train", difficulty: str | Difficulty | None = None,
               stream: str = "tasks") -> Iterable[dict]:
    """Endless deterministic stream of tasks belonging to `split`."""
    _check_split(split)
    d = get_difficulty(difficulty)
    rng = _stream(stream, split, seed)
    misses = 0
    while True:
        t = make_task(rng, d)
        if task_split(t["items"]) == split:
            misses = 0
            yield t
        else:
            misses += 1
            if misses > 10_000:  # only a degenerate difficulty with (almost) no task on this side
                raise ValueError(f"difficulty {d} has (almost) no tasks in the {split} split")


def tasks(n: int, seed: int = 0, split: str = "train", difficulty: str | Difficulty | None = None) -> list[dict]:
    """The first n tasks of the (seed, split, difficulty) stream."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = iter_tasks(seed, split, difficulty)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

# Lenient: anywhere in the text, e.g. at the end of a worked solution; the last match counts.
_TOTAL_RE = re.compile(r"Итого:\s*(\d+)\s*рубл")
# Strict: the whole completion (outer whitespace aside) is exactly the answer line.
_FORMAT_RE = re.compile(r"Итого: (0|[1-9]\d*) рублей\.")

FORMAT_REWARD = 0.1  # right format, wrong total
CORRECT_REWARD = 1.0  # right format, right total


def parse_total(text: str) -> int | None:
    """The total stated in `text` ("Итого: <int> рубл..."), the last one if several; else None."""
    if not isinstance(text, str):
        return None
    found = _TOTAL_RE.findall(text)
    return int(found[-1]) if found else None


def format_ok(completion: str) -> bool:
    """True when the completion, stripped of outer whitespace, is exactly `Итого: <int> рублей.`
    (no extra text before or after, one space each side of the number, no leading zeros)."""
    return isinstance(completion, str) and _FORMAT_RE.fullmatch(completion.strip()) is not None


def score(completion: str, total: int) -> dict:
    """Score a completion against the true total.

    correct:   the stated total (parse_total, lenient about surrounding text) equals `total`
    format_ok: the completion is exactly `Итого: <int> рублей.` (see format_ok)
    reward:    1.0 if format_ok and correct, 0.1 if format_ok with a wrong total, else 0.0
               (a right total in a wrong format earns nothing).
    """
    ok = format_ok(completion)
    value = parse_total(completion)
    correct = value is not None and value == int(total)
    if ok and correct:
        reward = CORRECT_REWARD
    elif ok:
        reward = FORMAT_REWARD
    else:
        reward = 0.0
    return {"correct": correct, "format_ok": ok, "reward": reward}


def reward(completion: str, total: int) -> float:
    """Just the scalar reward of `score`."""
    return score(completion, total)["reward"]


# ----------------------------------------------------------------------------------------------
# Data generators (lists of JSON-serialisable dicts)
# ----------------------------------------------------------------------------------------------


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def sft_rows(n: int, seed: int = 0, difficulty: str | Difficulty | None = None, split: str = "train") -> list[dict]:
    """Conversational SFT rows: {"messages": [user prompt, assistant answer], "total"}."""
    return [
        {"messages": _user(t["prompt"]) + _assistant(t["answer"]), "total": t["total"]}
        for t in tasks(n, seed, split, difficulty)
    ]


def prompt_rows(n: int, seed: int = 0, difficulty: str | Difficulty | None = None, split: str = "train",
                as_text: bool = False) -> list[dict]:
    """Prompt-only rows for RL / evaluation: {"prompt": [user message], "answer", "total"}."""
    return [
        {"prompt": t["prompt"] if as_text else _user(t["prompt"]), "answer": t["answer"], "total": t["total"]}
        for t in tasks(n, seed, split, difficulty)
    ]


# ----------------------------------------------------------------------------------------------
# The calculator tool (multi-turn RL, docs/agents.md)
# ----------------------------------------------------------------------------------------------

_CALC_OPS = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mult": lambda a, b: a * b,
             "Div": lambda a, b: a / b}


def calc(expression: str) -> float:
    """Evaluate an arithmetic expression of numbers, + - * / and parentheses.

    Args:
        expression: The expression, for example "55+80+230".
    """
    import ast

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op).__name__ in _CALC_OPS:
            return _CALC_OPS[type(node.op).__name__](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ValueError(f"not a number or + - * / in {expression!r}")

    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression must be text of at most 200 characters")
    return ev(ast.parse(expression.strip(), mode="eval"))


def calc_schema() -> dict:
    """The JSON schema of `calc`, as a chat template's `tools=` takes it."""
    from transformers.utils import get_json_schema

    return get_json_schema(calc)


def sft_tools_rows(n: int, seed: int = 0, difficulty: str | Difficulty | None = None,
                   split: str = "train", call_rate: float = 1.0) -> list[dict]:
    """Tool-use transcripts: the user's list, an assistant turn calling `calc` on the prices, the
    tool's answer, and the final answer: {"messages", "tools" (JSON text of [calc's schema]),
    "total"}. Train with chat_template=toy-tools (see docs/agents.md).

    call_rate: the share of rows that call the tool (drawn per row, seeded); the others answer at
    once with the right total, the tool still offered. A model trained on such a mix has learnt
    the call format but not when calling pays: the choice RL with the tool in the loop teaches.
    Raises ValueError when call_rate is outside [0, 1]."""
    if not 0.0 <= call_rate <= 1.0:
        raise ValueError(f"call_rate={call_rate}: give a share in [0, 1]")
    tools = json.dumps([calc_schema()], ensure_ascii=False)
    pick = random.Random(f"sft-tools-call-{seed}-{split}")
    rows = []
    for t in tasks(n, seed, split, difficulty):
        if call_rate < 1.0 and pick.random() >= call_rate:
            rows.append({"messages": _user(t["prompt"]) + _assistant(t["answer"]), "tools": tools, "total": t["total"]})
            continue
        expr = "+".join(str(v) for _, v in t["items"])
        call = {"type": "function", "function": {"name": "calc", "arguments": {"expression": expr}}}
        msgs = _user(t["prompt"]) + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "name": "calc", "content": str(t["total"])}]
        rows.append({"messages": msgs + _assistant(t["answer"]), "tools": tools, "total": t["total"]})
    return rows


MISTAKE_KINDS = ("off_by", "dropped_item", "digit_slip", "format")


def _digit_slip(total: int, rng: random.Random) -> int:
    s = list(str(total))
    if len(s) >= 2 and rng.random() < 0.5:
        i = rng.randrange(len(s) - 1)
        if s[i] != s[i + 1] and not (i == 0 and s[i + 1] == "0"):
            s[i], s[i + 1] = s[i + 1], s[i]  # swap two neighbouring digits
            return int("".join(s))
    i = rng.randrange(len(s))
    choices = [c for c in "0123456789" if c != s[i] and not (i == 0 and c == "0" and len(s) > 1)]
    s[i] = rng.choice(choices)
    return int("".join(s))


def wrong_total(task: dict, rng: random.Random, kind: str | None = None) -> tuple[int, str]:
    """A plausible wrong total for a task: (value, kind) with kind in off_by/dropped_item/digit_slip."""
    total = task["total"]
    kind = kind or rng.choice(("off_by", "dropped_item", "digit_slip"))
    if kind == "dropped_item" and len(task["items"]) >= 2:
        value = total - rng.choice(task["items"])[1]
    elif kind == "digit_slip":
        value = _digit_slip(total, rng)
    else:
        kind = "off_by"
        value = total + rng.choice((-100, -10, -5, -1, 1, 5, 10, 100))
    if value == total or value < 0:
        value, kind = total + 10, "off_by"
    return value, kind


def wrong_format(total: int, rng: random.Random) -> str:
    """The right total in a wrong format."""
    return rng.choice((
        f"Ответ: {total}",
        f"{total} рублей",
        f"Итого: {total} рублей",
        f"Итого: {total} руб.",
        f"Итого: {total}",
        f"Итого {total} рублей.",
        f"Общая сумма: {total} рублей.",
        f"Итого: {total} рублей. Проверь расчёт ещё раз.",
    ))


def rejected_answer(task: dict, rng: random.Random, p_format: float = 0.3) -> tuple[str, str]:
    """(text, kind): a plausible mistake, a wrong format with probability p_format, else a wrong total."""
    if rng.random() < p_format:
        return wrong_format(task["total"], rng), "format"
    value, kind = wrong_total(task, rng)
    return format_answer(value), kind


def preference_rows(n: int, seed: int = 0, difficulty: str | Difficulty | None = None, split: str = "train",
                    as_text: bool = False, p_format: float = 0.3) -> list[dict]:
    """Preference pairs: {"prompt", "chosen", "rejected", "total", "mistake"}.

    chosen is the reference answer; rejected is a plausible mistake (off by a small amount, a
    dropped item, a digit slip, or -- with probability p_format -- the right total in a wrong
    format). Conversational (message lists) by default, plain strings with as_text=True."""
    rng = _stream("rejected", split, seed)
    rows = []
    for t in tasks(n, seed, split, difficulty):
        bad, kind = rejected_answer(t, rng, p_format)
        if as_text:
            row = {"prompt": t["prompt"], "chosen": t["answer"], "rejected": bad}
        else:
            row = {"prompt": _user(t["prompt"]), "chosen": _assistant(t["answer"]), "rejected": _assistant(bad)}
        row.update(total=t["total"], mistake=kind)
        rows.append(row)
    return rows


# ---- pretraining text -------------------------------------------------------------------------
#
# Documents that show expense lists and their totals in many phrasings, plus running sums and
# addition facts -- but never the chat markup or the exact instruction + answer pairing of the
# SFT data, so that SFT still has the answer format to teach.

_HEADERS = (
    "Расходы за день:", "Список покупок:", "Траты за неделю:", "Мои расходы:", "Чек:",
    "Покупки в магазине:", "Расходы:", "Бюджет на сегодня:", "Что купили:", "Затраты:",
)
# Deliberately never the exact answer line `Итого: <total> рублей.`: the base model knows
# totals in many phrasings, SFT teaches the one the reward asks for.
_TOTAL_LINES = (
    "Итого {t} рублей.", "Всего: {t} рублей.", "Сумма: {t} руб.", "Общая сумма: {t} рублей.",
    "Всего потрачено {t} рублей.", "Итого: {t} руб.", "Вместе получается {t} рублей.", "Итого: {t}",
)


def _doc_list(t: dict, rng: random.Random) -> str:
    sep = rng.choice((": ", " - ", " — "))
    unit = rng.choice(("", "", " руб.", " рублей"))
    lines = [rng.choice(_HEADERS)] + [f"{n}{sep}{v}{unit}" for n, v in t["items"]]
    lines.append(rng.choice(_TOTAL_LINES).format(t=t["total"]))
    return "\n".join(lines)


def _doc_inline(t: dict, rng: random.Random) -> str:
    parts = ", ".join(f"{n.lower()} {v}" for n, v in t["items"])
    return rng.choice((
        f"Сегодня потратил: {parts}. Всего {t['total']} рублей.",
        f"Купили: {parts}. Итого {t['total']} руб.",
        f"Расходы: {parts}. Сумма: {t['total']} руб.",
    ))


def _doc_running(t: dict, rng: random.Random) -> str:
    lines = [rng.choice(_HEADERS)]
    acc = 0
    for i, (n, v) in enumerate(t["items"]):
        if i == 0:
            acc = v
            lines.append(f"{n}: {v} (всего {acc})")
        else:
            lines.append(f"{n}: {v} ({acc} + {v} = {acc + v})")
            acc += v
    lines.append(rng.choice(_TOTAL_LINES).format(t=acc))
    return "\n".join(lines)


def _doc_equation(t: dict, rng: random.Random) -> str:
    vals = [v for _, v in t["items"]]
    eq = " + ".join(str(v) for v in vals) + f" = {t['total']}"
    return rng.choice((eq, f"Считаем: {eq}.", f"{eq}\nВсего: {t['total']} рублей."))


def _doc_facts(t: dict, rng: random.Random, d: Difficulty) -> str:
    lo, hi = d.values()
    lines = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(lo, hi) * d.step, rng.randint(lo, hi) * d.step
        lines.append(f"{a} + {b} = {a + b}")
    return "\n".join(lines)


# (document kind, weight): how often each kind of pretraining document appears.
PRETRAIN_MIX = (
    (_doc_list, 0.25),
    (_doc_inline, 0.10),
    (_doc_running, 0.20),
    (_doc_equation, 0.10),
    (_doc_facts, 0.35),
)


def pretrain_texts(n: int, seed: int = 0, difficulty: str | Difficulty | None = None,
                   split: str = "train", doc_chars: int = 340) -> list[dict]:
    """Plain-text documents for pretraining the base model: {"text": ...}.

    A document is sections separated by a blank line, added until it is at least `doc_chars`
    characters long (about 250 tokens of the toy tokenizer for 340), so documents have nearly
    equal lengths and batch with little padding. Each section is one of: a titled list with a
    total line, an inline list, a list with running sums, an addition equation, or a few
    addition facts (weights: PRETRAIN_MIX)."""
    d = get_difficulty(difficulty)
    if doc_chars < 1:
        raise ValueError(f"doc_chars must be >= 1, got {doc_chars}")
    rng = _stream("pretrain-style", split, seed)
    it = iter_tasks(seed, split, d, stream="pretrain")
    kinds, weights = zip(*PRETRAIN_MIX)
    out = []
    for _ in range(n):
        parts: list[str] = []
        size = -2  # length of "\n\n".join(parts)
        while size < doc_chars:
            f = rng.choices(kinds, weights)[0]
            t = next(it)
            parts.append(f(t, rng, d) if f is _doc_facts else f(t, rng))
            size += len(parts[-1]) + 2
        out.append({"text": "\n\n".join(parts)})
    return out


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines (UTF-8, non-ASCII kept) atomically: a temp file, then os.replace.
    The file gets the usual mode under the umask (mkstemp alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def difficulty_dict(difficulty: str | Difficulty | None) -> dict:
    return asdict(get_difficulty(difficulty))
