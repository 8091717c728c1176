"""Reward sources: what the RL recipes and `alignkit eval` score completions with.

Every source is called the same way::

    reward(prompts, completions, **columns) -> list[float | None]

`prompts` are the prompts as the data holds them (message lists or text), `completions` the
generated answers (text), `columns` the prompt set's other columns as lists aligned with them
(`total=[...]`, `answer=[...]`). The result has one entry per completion: a float, or None when
the source cannot score that sample (for example its reference answer is missing). Callers
decide what None means: `alignkit eval` leaves such samples out of the reward mean and reports
their count (`reward_none`); the RL recipes turn them into NaN (`rewards_tensor`), which the
advantage estimators read as "not scored": advantage 0, no part in group statistics, masked out
of the loss (`alignkit.advantages.scored_mask`). They are never counted as 0.

A source is one of

* a built-in (`BUILTINS`): `toy`, `exact_number` (aliases `gsm8k`, `last_number`), `regex`,
  `length_penalty`;
* a Python function named `module:function` or `path/to/file.py:function`;
* a trained reward model folder (`alignkit.models.reward.RewardModel`), or in Python any object
  with a `score(prompts, completions)` method.

Several sources combine as a weighted sum (`build_reward`). Mistakes -- an unknown source, a
function that raises, returns the wrong count or a non-number, or runs past its `timeout` --
stop with one line naming the source (`UserError`). See docs/rewards.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from alignkit.data.prompts import columns_of, load_prompt_set  # noqa: F401  (moved to data/; re-exported)
from alignkit.errors import UserError

__all__ = [
    "RewardFn",
    "Reward",
    "rewards_tensor",
    "RewardTermFn",
    "BUILTINS",
    "build_reward",
    "load_callable",
    "parse_number",
    "last_number",
    "gsm8k_number",
    "reference_number",
    "extract_answer",
    "answer_format_ok",
    "numbers_equal",
    "load_prompt_set",
    "load_gsm8k",
]

# reward(prompts, completions, **columns) -> list[float | None]
RewardFn = Callable[..., list]

# ----------------------------------------------------------------------------------------------
# Numbers in text
# ----------------------------------------------------------------------------------------------

# A number as people write it: optional sign, digits with optional thousands commas ("1,000"),
# an optional decimal part ("1000.0"). A trailing sentence period is not part of the number.
_NUMBER_RE = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_GSM8K_RE = re.compile(r"####\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def parse_number(text: str) -> float | None:
    """The number `text` is (commas, a leading $ and outer spaces allowed): '1,000' -> 1000.0,
    '1000.0' -> 1000.0, '$ 72' -> 72.0; None when it is not a number."""
    if isinstance(text, bool):
        return None
    if isinstance(text, numbers.Real):
        return float(text)
    if not isinstance(text, str):
        return None
    s = text.strip().lstrip("$").strip()
    if not _NUMBER_RE.fullmatch(s):
        return None
    return float(s.replace(",", ""))


def _numbers(text: str) -> list[float]:
    return [float(m.group(0).replace(",", "")) for m in _NUMBER_RE.finditer(text)]


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    if not isinstance(text, str):
        return None
    found = _numbers(text)
    return found[-1] if found else None


def gsm8k_number(text: str) -> float | None:
    """The number after the last `####` in `text` (the GSM8K answer convention), or None."""
    if not isinstance(text, str):
        return None
    found = _GSM8K_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def reference_number(value: Any) -> float | None:
    """A reference answer as a number: numbers as they are; text: the number after `####` when
    there is one (GSM8K `answer`), else the last number in it; None when there is none."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str):
        got = gsm8k_number(value)
        return got if got is not None else last_number(value)
    return None


def numbers_equal(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    """|a - b| <= tol * max(1, |b|); False when either is None."""
    if a is None or b is None:
        return False
    return abs(a - b) <= tol * max(1.0, abs(b))


ANSWER_MODES = ("toy", "gsm8k", "last_number")


def extract_answer(text: str, mode: str) -> float | None:
    """The number a completion answers with.

    toy:         the total of the last `Итого: X рубл...` (the toy task's answer line)
    gsm8k:       the number after the last `####`
    last_number: the last number anywhere in the text
    """
    if mode == "toy":
        from alignkit.toy.world import parse_total

        v = parse_total(text)
        return None if v is None else float(v)
    if mode == "gsm8k":
        return gsm8k_number(text)
    if mode == "last_number":
        return last_number(text)
    raise ValueError(f"unknown answer mode {mode!r}; choose one of {', '.join(ANSWER_MODES)}")


def answer_format_ok(text: str, mode: str) -> bool:
    """Does the completion state its answer in the task's format?

    toy:         the whole completion (outer spaces aside) is exactly `Итого: <int> рублей.`
    gsm8k:       it contains `#### <number>`
    last_number: it contains a number
    """
    if mode == "toy":
        from alignkit.toy.world import format_ok

        return format_ok(text)
    return extract_answer(text, mode) is not None


# ----------------------------------------------------------------------------------------------
# Built-in sources: per-sample rules
# ----------------------------------------------------------------------------------------------


class _Builtin:
    """A per-sample rule `rule(completion, row) -> float | None` applied to every sample.
    `needs` names the columns it reads (checked once per call, with a clear error)."""

    def __init__(self, name: str, rule: Callable[[str, dict], float | None], needs: Callable[[dict], list[str]]):
        self.name = name
        self.rule = rule
        self.needs = needs

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float | None]:
        for col in self.needs(columns):
            if col not in columns:
                have = ", ".join(sorted(columns)) or "none"
                raise UserError(f"reward '{self.name}' needs a '{col}' column in the prompt set (columns: {have}); "
                                f"add it or set args.column")
        out = []
        for i, c in enumerate(completions):
            row = {k: v[i] for k, v in columns.items()}
            try:
                out.append(self.rule(c if isinstance(c, str) else "", row))
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"reward '{self.name}' failed on sample {i} ({_preview(c)}): "
                                f"{type(e).__name__}: {_one_line(e)}") from None
        return out


def _toy(column: str = "total") -> _Builtin:
    """The toy task's rule (`alignkit.toy.world.reward`): 1.0 for exactly `Итого: <total> рублей.`,
    0.1 for that format with a wrong total, 0.0 otherwise. Reads the true total from `column`."""
    from alignkit.toy.world import reward as toy_reward

    def rule(completion: str, row: dict) -> float | None:
        total = reference_number(row[column])
        if total is None or total != int(total):
            return None
        return float(toy_reward(completion, int(total)))

    return _Builtin("toy", rule, lambda cols: [column])


def _exact_number(mode: str = "last_number", column: str | None = None, tol: float = 1e-6,
                  name: str = "exact_number") -> _Builtin:
    """1.0 when the completion's answer equals the reference number, else 0.0; None when the
    reference has no number. `mode` says how the completion's answer is read (`extract_answer`);
    the reference comes from `column` (default: `total` when present, else `answer`) through
    `reference_number` (`#### X` if present, else its last number)."""
    if mode not in ANSWER_MODES:
        raise UserError(f"reward '{name}': unknown mode {mode!r}; choose one of {', '.join(ANSWER_MODES)}")

    def ref_col(cols: dict) -> str:
        if column:
            return column
        return "total" if "total" in cols else "answer"

    def rule(completion: str, row: dict) -> float | None:
        ref = reference_number(row[ref_col(row)])
        if ref is None:
            return None
        return 1.0 if numbers_equal(extract_answer(completion, mode), ref, tol) else 0.0

    return _Builtin(name, rule, lambda cols: [ref_col(cols)])


def _regex(pattern: str | None = None, fullmatch: bool = False, name: str = "regex") -> _Builtin:
    """1.0 when `pattern` is found in the completion (`fullmatch`: matches the whole completion,
    outer whitespace stripped), else 0.0. Python `re` syntax; inline flags like (?s) work."""
    if not pattern:
        raise UserError(f"reward '{name}' needs a pattern: {{source: regex, args: {{pattern: '...'}}}}")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"reward '{name}': bad pattern {pattern!r} ({e}); fix the regular expression") from None

    def rule(completion: str, row: dict) -> float:
        hit = rx.fullmatch(completion.strip()) if fullmatch else rx.search(completion)
        return 1.0 if hit else 0.0

    return _Builtin(name, rule, lambda cols: [])


def _length_penalty(target: int = 0, coef: float = 0.01, unit: str = "chars", tokenizer=None,
                    name: str = "length_penalty") -> _Builtin:
    """-coef * max(0, length - target), length in `unit`: chars, words (whitespace-separated) or
    tokens (needs a tokenizer: args.tokenizer=PATH, or the caller's, e.g. the evaluated model's)."""
    if unit not in ("chars", "words", "tokens"):
        raise UserError(f"reward '{name}': unit must be chars, words or tokens, got {unit!r}")
    if unit == "tokens":
        if tokenizer is None:
            raise UserError(f"reward '{name}' with unit=tokens needs a tokenizer: set args.tokenizer=PATH")
        if isinstance(tokenizer, str):
            from alignkit.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)

    def length(text: str) -> int:
        if unit == "chars":
            return len(text)
        if unit == "words":
            return len(text.split())
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def rule(completion: str, row: dict) -> float:
        return -float(coef) * max(0, length(completion) - int(target))

    return _Builtin(name, rule, lambda cols: [])


# name -> (factory, fixed keyword arguments). Factories take the term's `args`.
BUILTINS: dict[str, tuple[Callable[..., _Builtin], dict]] = {
    "toy": (_toy, {}),
    "exact_number": (_exact_number, {}),
    "gsm8k": (_exact_number, {"mode": "gsm8k", "name": "gsm8k"}),
    "last_number": (_exact_number, {"mode": "last_number", "name": "last_number"}),
    "regex": (_regex, {}),
    "length_penalty": (_length_penalty, {}),
}


def _make_builtin(name: str, args: dict, tokenizer=None) -> _Builtin:
    factory, fixed = BUILTINS[name]
    params = inspect.signature(factory).parameters
    allowed = [p for p in params if p not in ("name",) and p not in fixed]
    for k in args:
        if k not in allowed:
            raise UserError(f"reward '{name}': unknown argument '{k}'; valid: {', '.join(allowed) or 'none'}")
    kw = dict(args)
    if "tokenizer" in allowed and kw.get("tokenizer") is None and tokenizer is not None:
        kw["tokenizer"] = tokenizer
    if "name" in params and "name" not in fixed:
        kw["name"] = name
    try:
        return factory(**kw, **fixed)
    except TypeError as e:
        raise UserError(f"reward '{name}': bad arguments ({_one_line(e)})") from None


# ----------------------------------------------------------------------------------------------
# Python functions: module:function or path/to/file.py:function
# ----------------------------------------------------------------------------------------------


def load_callable(spec: str) -> Callable:
    """The function named by `module:function` or `path/to/file.py:function`.

    A module is imported as Python would, with the current directory on the path; a file is
    loaded under a private module name (its folder is not added to the path)."""
    target, sep, fname = spec.rpartition(":")
    if not sep or not target or not fname:
        raise UserError(f"reward '{spec}': expected module:function or path/to/file.py:function")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if is_file:
        path = Path(os.path.expanduser(target))
        if not path.is_file():
            raise UserError(f"reward '{spec}': file {target} not found; check the path")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"_alignkit_reward_{path.stem}_{digest}"
        mod = sys.modules.get(mod_name)
        if mod is None:
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            if spec_obj is None or spec_obj.loader is None:
                raise UserError(f"reward '{spec}': cannot load {target} as Python")
            mod = importlib.util.module_from_spec(spec_obj)
            try:
                spec_obj.loader.exec_module(mod)
            except Exception as e:
                raise UserError(f"reward '{spec}': importing {target} raised {type(e).__name__}: {_one_line(e)}") \
                    from None
            sys.modules[mod_name] = mod
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            mod = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and target.split(".")[0] == e.name.split(".")[0]:
                raise UserError(f"reward '{spec}': no module named '{target}'; make it importable (PYTHONPATH) or "
                                f"give a file: path/to/file.py:{fname}") from None
            raise UserError(f"reward '{spec}': importing {target} raised ModuleNotFoundError: {_one_line(e)}") \
                from None
        except Exception as e:
            raise UserError(f"reward '{spec}': importing {target} raised {type(e).__name__}: {_one_line(e)}") from None
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    fn = getattr(mod, fname, None)
    if fn is None:
        names = [n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == mod.__name__]
        hint = f"; it defines: {', '.join(names[:10])}" if names else ""
        raise UserError(f"reward '{spec}': {target} has no function '{fname}'{hint}")
    if not callable(fn):
        raise UserError(f"reward '{spec}': '{fname}' in {target} is not a function")
    return fn


class _Callable:
    """A user function `fn(prompts, completions, **columns) -> list[float | None]`.

    A function with `**kwargs` receives every column; otherwise only the columns it names as
    parameters (so `def f(prompts, completions, answer)` gets just `answer`)."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.var_kw = True
        self.named: dict[str, bool] = {}  # column parameter -> has a default
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
        if len(positional) < 2 and not var_pos:
            raise UserError(f"reward '{name}' must accept (prompts, completions, **columns); "
                            f"its signature is {name.rsplit(':', 1)[-1]}{sig}")
        self.var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
        rest = positional[2:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
        self.named = {p.name: p.default is not p.empty for p in rest}

    def __call__(self, prompts: list, completions: list[str], **columns):
        if self.var_kw:
            kw = columns
        else:
            for col, has_default in self.named.items():
                if col not in columns and not has_default:
                    have = ", ".join(sorted(columns)) or "none"
                    raise UserError(f"reward '{self.name}' takes '{col}' but the prompt set has no such column "
                                    f"(columns: {have})")
            kw = {k: v for k, v in columns.items() if k in self.named}
        return self.fn(prompts, completions, **kw)


# ----------------------------------------------------------------------------------------------
# Reward models
# ----------------------------------------------------------------------------------------------


def _check_reward_folder(spec: str, path: Path) -> None:
    """A folder given as a reward source must hold a reward model: not be empty, have a config,
    and not be a plain causal LM, whose missing score head transformers would fill with random
    weights (scores that mean nothing) without an error."""
    import json

    how = "point reward= at a folder saved by `alignkit rm`, or use a built-in or module:function"
    if not any(path.iterdir()):
        raise UserError(f"reward '{spec}': the folder is empty; {how}")
    adapter = path / "adapter_config.json"
    conf = path / "config.json"
    if adapter.is_file() and not conf.is_file():
        try:
            task = json.loads(adapter.read_text(encoding="utf-8")).get("task_type")
        except (OSError, ValueError):
            task = None
        if task == "CAUSAL_LM":
            raise UserError(f"reward '{spec}': a causal-LM adapter, not a reward model (no score head); train one with "
                            f"`alignkit rm`, or {how}")
        return
    if not conf.is_file():
        raise UserError(f"reward '{spec}': not a model folder (no config.json); {how}")
    try:
        c = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"reward '{spec}': cannot read config.json ({_one_line(e)}); {how}") from None
    archs = [str(a) for a in (c.get("architectures") or [])]
    is_rm = ("alignkit_reward" in c or (path / "reward_config.json").is_file()
             or any(a.endswith("ForSequenceClassification") for a in archs))
    if not is_rm:
        kind = f" ({', '.join(archs)})" if archs else ""
        raise UserError(f"reward '{spec}': a causal language model{kind}, not a reward model: it has no score head, so "
                        f"its scores would be random; train one with `alignkit rm model={spec} data=PAIRS`, or use a "
                        f"built-in or module:function")


class _Model:
    """A trained reward model: `score(prompts, completions)` -> one float per sample."""

    def __init__(self, name: str, scorer=None):
        self.name = name
        if scorer is None:
            try:
                from alignkit.models.reward import RewardModel
            except ImportError as e:
                raise UserError(f"reward '{name}': reward models need alignkit.models.reward, which cannot be "
                                f"imported ({_one_line(e)})") from None
            try:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
                scorer = RewardModel.from_pretrained(name, device=device)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"reward '{name}': could not load a reward model ({type(e).__name__}: "
                                f"{_one_line(e)}); point it at a folder saved by `alignkit rm`") from None
        self.scorer = scorer

    def __call__(self, prompts: list, completions: list[str], **columns):
        return self.scorer.score(prompts, completions)


# ----------------------------------------------------------------------------------------------
# Checked calls: errors name the source, counts and types are verified, optional timeout
# ----------------------------------------------------------------------------------------------


class _TimedOut(Exception):
    pass


def _one_line(e: BaseException | str) -> str:
    s = " ".join(str(e).split())
    return (s or (type(e).__name__ if isinstance(e, BaseException) else ""))[:300]


def _preview(text: Any, n: int = 40) -> str:
    s = text if isinstance(text, str) else repr(text)
    s = " ".join(s.split())
    return "completion " + repr(s[:n] + ("..." if len(s) > n else ""))


def _run_with_timeout(fn: Callable[[], Any], timeout: float | None, name: str):
    """fn() in a daemon thread, waiting at most `timeout` seconds. A thread cannot be killed: on
    timeout the call keeps running in the background until it returns, and its result is dropped."""
    if timeout is None:
        return fn()
    box: dict = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, name=f"alignkit-reward-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _TimedOut
    if "err" in box:
        raise box["err"]
    return box.get("out")


def rewards_tensor(values: Iterable[float | None]):
    """Reward values (one float or None per sample) as a float32 tensor (B,), None -> NaN.

    NaN is how "cannot score" travels to `alignkit.advantages`: every estimator there leaves
    NaN samples out of its statistics and gives them advantage 0, and `scored_mask` masks them
    out of the loss. Counting them as 0 instead would bias their group ([None, 1, 0, 0] would
    give [-0.5, 1.5, -0.5, -0.5] instead of [0, 1.1547, -0.5774, -0.5774])."""
    import torch

    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def _check_values(name: str, out: Any, n: int, completions: list) -> list[float | None]:
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # tensor / ndarray
        out = out.tolist()
    if isinstance(out, (numbers.Real, type(None))) and not isinstance(out, bool):
        got = "None" if out is None else type(out).__name__
        raise UserError(f"reward '{name}' returned a single {got}; it must return a list with one float or None per "
                        f"completion ({n} here)")
    if not isinstance(out, (list, tuple)):
        raise UserError(f"reward '{name}' returned {type(out).__name__}; it must return a list with one float or None "
                        f"per completion")
    if len(out) != n:
        raise UserError(f"reward '{name}' returned {len(out)} values for {n} completions; it must return one float "
                        f"or None per completion, in order")
    vals: list[float | None] = []
    for i, v in enumerate(out):
        if v is not None and hasattr(v, "item") and not isinstance(v, numbers.Real):
            try:
                v = v.item()
            except (ValueError, RuntimeError):
                pass
        if v is None:
            vals.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise UserError(f"reward '{name}' returned {type(v).__name__} {_one_line(repr(v))[:40]} for sample {i} "
                            f"({_preview(completions[i])}); expected a float or None")
        f = float(v)
        if not math.isfinite(f):
            raise UserError(f"reward '{name}' returned {f} for sample {i} ({_preview(completions[i])}); rewards "
                            f"must be finite (return None for 'cannot score')")
        vals.append(f)
    return vals


class RewardTermFn:
    """One source with its weight and call policy.

    timeout:    seconds per call (None: no limit). The call runs in a separate thread; when it
                does not return in time, `on_timeout` decides: "error" stops with a clear
                error, "none" gives None for every sample of that call.
    """

    def __init__(self, fn: Callable, name: str, weight: float = 1.0, timeout: float | None = None,
                 on_timeout: str = "error", locate_errors: bool = True):
        if on_timeout not in ("error", "none"):
            raise UserError(f"reward '{name}': on_timeout must be 'error' or 'none', got {on_timeout!r}")
        if timeout is not None and timeout <= 0:
            raise UserError(f"reward '{name}': timeout must be > 0 seconds, got {timeout}")
        self.fn = fn
        self.name = name
        self.weight = float(weight)
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.locate_errors = locate_errors
        self.timeouts = 0  # calls that ran out of time (on_timeout="none")

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float | None]:
        n = len(completions)
        if len(prompts) != n:
            raise UserError(f"reward '{self.name}': {len(prompts)} prompts for {n} completions; pass one prompt per "
                            f"completion")
        for k, v in columns.items():
            if len(v) != n:
                raise UserError(f"reward '{self.name}': column '{k}' has {len(v)} values for {n} completions")
        try:
            out = _run_with_timeout(lambda: self.fn(list(prompts), list(completions), **columns), self.timeout,
                                    self.name)
        except _TimedOut:
            if self.on_timeout == "none":
                self.timeouts += 1
                return [None] * n
            raise UserError(f"reward '{self.name}' took longer than its timeout of {self.timeout:g} s on a call with "
                            f"{n} samples; raise timeout, make it faster, or set on_timeout: none") from None
        except UserError:
            raise
        except Exception as e:
            raise UserError(self._describe_failure(e, prompts, completions, columns)) from None
        return _check_values(self.name, out, n, completions)

    def _describe_failure(self, e: Exception, prompts, completions, columns) -> str:
        """`reward 'x' raised ValueError: ... on sample 3 (...)`: the batch is re-run one sample at a
        time to find the first one that fails (skipped for calls with a timeout)."""
        where = f"on a call with {len(completions)} samples"
        if self.locate_errors and len(completions) > 1 and self.timeout is None:
            for i in range(len(completions)):
                try:
                    self.fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
                except UserError:
                    raise
                except Exception as e1:
                    e, where = e1, f"on sample {i} ({_preview(completions[i])})"
                    break
        elif len(completions) == 1:
            where = f"on sample 0 ({_preview(completions[0])})"
        return f"reward '{self.name}' raised {type(e).__name__}: {_one_line(e)} {where}"


class Reward:
    """A weighted sum of reward sources, itself a reward source.

        reward(sample) = sum_k weight_k * source_k(sample)

    A sample that any source cannot score (None) is None overall, or `none_as` when that is set.
    `score_terms` gives each source's values before weighting (eval reports them per source)."""

    def __init__(self, terms: list[RewardTermFn], none_as: float | None = None):
        if not terms:
            raise UserError("no reward source given; set reward=toy, reward=module:function, or a reward model folder")
        self.terms = terms
        self.none_as = none_as
        names = [t.name for t in terms]
        dup = {n for n in names if names.count(n) > 1}
        self.keys = [f"{t.name}#{i}" if t.name in dup else t.name for i, t in enumerate(terms)]

    @property
    def name(self) -> str:
        """The combination as text, e.g. "toy + 0.5*length"."""
        parts = []
        for t in self.terms:
            parts.append(t.name if t.weight == 1.0 else f"{t.weight:g}*{t.name}")
        return " + ".join(parts)

    def score_terms(self, prompts: list, completions: list[str], **columns) -> dict[str, list[float | None]]:
        """Each source's unweighted values: {key: [value or None per completion]}; `columns`
        are the prompt set's other columns, one value per completion."""
        return {key: t(prompts, completions, **columns) for key, t in zip(self.keys, self.terms)}

    def combine(self, per_term: dict[str, list[float | None]]) -> list[float | None]:
        """The weighted sum of `score_terms` output per completion; None (or `none_as`) where any
        source gave None."""
        out: list[float | None] = []
        cols = [per_term[k] for k in self.keys]
        for vals in zip(*cols):
            if any(v is None for v in vals):
                out.append(self.none_as)
            else:
                out.append(sum(t.weight * v for t, v in zip(self.terms, vals)))
        return out

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float | None]:
        return self.combine(self.score_terms(prompts, completions, **columns))

    @property
    def timeouts(self) -> int:
        """How many calls of the sources ran past their timeout so far."""
        return sum(t.timeouts for t in self.terms)


# ----------------------------------------------------------------------------------------------
# Building a reward from a config value
# ----------------------------------------------------------------------------------------------


def _term_from_source(source: Any, weight: float = 1.0, timeout: float | None = None, on_timeout: str = "error",
                      args: dict | None = None, tokenizer=None) -> RewardTermFn:
    args = dict(args or {})
    if isinstance(source, RewardTermFn):
        return source
    if not isinstance(source, str):
        if hasattr(source, "score") and callable(source.score):
            name = getattr(source, "name", None) or type(source).__name__
            return RewardTermFn(_Model(str(name), scorer=source), str(name), weight, timeout, on_timeout,
                                locate_errors=False)
        if callable(source):
            name = getattr(source, "__qualname__", None) or getattr(source, "__name__", None) or repr(source)
            return RewardTermFn(_Callable(source, name), name, weight, timeout, on_timeout)
        raise UserError(f"reward source must be text (a built-in, module:function or a folder), got "
                        f"{type(source).__name__}")
    spec = source.strip()
    if not spec:
        raise UserError("a reward term has no source; set source: toy, module:function, or a reward model folder")
    if spec in BUILTINS:
        return RewardTermFn(_make_builtin(spec, args, tokenizer), spec, weight, timeout, on_timeout)
    if args:
        raise UserError(f"reward '{spec}': args are for built-in sources ({', '.join(BUILTINS)}); a function gets "
                        f"the prompt set's columns instead")
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        _check_reward_folder(spec, path)
        return RewardTermFn(_Model(spec), spec, weight, timeout, on_timeout, locate_errors=False)
    if ":" in spec:
        fn = load_callable(spec)
        return RewardTermFn(_Callable(fn, spec), spec, weight, timeout, on_timeout)
    import difflib

    near = difflib.get_close_matches(spec, list(BUILTINS), n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise UserError(f"unknown reward source '{spec}': {hint}use a built-in ({', '.join(BUILTINS)}), module:function, "
                    f"path/to/file.py:function, or a reward model folder")


def build_reward(spec: Any, tokenizer=None) -> Reward:
    """A `Reward` from any of:

    * a string: one source (`toy`, `mymod:fn`, `runs/rm`) or the shorthand `toy + 0.5*mymod:fn`;
    * a list of terms, each a string or a mapping `{source, weight, timeout, on_timeout, args}`;
    * a mapping `{terms: [...], none_as: ...}` or a single term mapping `{source: ...}`;
    * a `alignkit.config.RewardSection`;
    * a Python function `fn(prompts, completions, **columns)` or an object with `score(prompts,
      completions)` (e.g. a loaded reward model);
    * a `Reward` (returned as is).

    `tokenizer` is handed to built-ins that count tokens (length_penalty with unit=tokens)."""
    from alignkit.config import RewardSection

    if isinstance(spec, Reward):
        return spec
    if spec is None:
        raise UserError("no reward source given; set reward=toy, reward=module:function, or a reward model folder")
    if not isinstance(spec, (str, list, tuple, dict, RewardSection)) and (callable(spec) or hasattr(spec, "score")):
        return Reward([_term_from_source(spec, tokenizer=tokenizer)])
    if not isinstance(spec, RewardSection):
        if isinstance(spec, (list, tuple)):
            items = [x for x in spec]
            if any(callable(x) and not isinstance(x, str) for x in items):  # Python objects in a list
                return Reward([_term_from_source(x, tokenizer=tokenizer) if not isinstance(x, dict)
                               else _term_from_source(tokenizer=tokenizer, **x) for x in items])
        try:
            spec = RewardSection.model_validate(spec)
        except Exception as e:
            errs = getattr(e, "errors", None)
            if callable(errs):
                err = errs()[0]
                loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
                raise UserError(f"bad reward spec: {loc + ': ' if loc else ''}{err['msg']} "
                                f"(got {err.get('input')!r})") from None
            raise UserError(f"bad reward spec: {_one_line(e)}") from None
    terms = [_term_from_source(t.source, t.weight, t.timeout, t.on_timeout, t.args, tokenizer) for t in spec.terms]
    return Reward(terms, none_as=spec.none_as)


# ----------------------------------------------------------------------------------------------
# Prompt sets with reference columns
# ----------------------------------------------------------------------------------------------


def load_gsm8k(path: str, split: str = "train", chat: bool = True, limit: int | None = None) -> list[dict]:
    """A GSM8K file (`{"question", "answer": "... #### 72"}`) as a prompt set: `prompt` = the
    question (as a user message when `chat`), `question` and `answer` kept, so the `gsm8k`
    reward (or `exact_number`) reads the target number after `####` from `answer`."""
    rows = load_prompt_set(path, split, prompt_column="question", chat=chat, limit=limit)
    for i, r in enumerate(rows):
        if "answer" not in r:
            raise UserError(f"{path}: no 'answer' column; GSM8K rows are {{question, answer: '... #### X'}}")
        if gsm8k_number(r["answer"]) is None:
            raise UserError(f"{path} row {i + 1}: 'answer' has no '#### <number>' final answer")
    return rows
