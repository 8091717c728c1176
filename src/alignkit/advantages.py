"""Advantage estimators: moving-average baseline (REINFORCE), leave-one-out (RLOO), group
normalisation (GRPO, Dr. GRPO), GAE (PPO), and masked whitening.

Grouped estimators take rewards (B,) laid out as contiguous groups: B = n_groups x group_size,
samples [g * group_size, (g + 1) * group_size) answer the same prompt g.

Two promises hold for every reward-based estimator here (`MovingAverageBaseline`,
`leave_one_out`, `group_normalized`, `whiten`):

* **Missing rewards.** NaN in `rewards` means "the reward source could not score this sample"
  (it returned None; `alignkit.rewards.rewards_tensor` makes the tensor). Such a sample gets
  advantage exactly 0 and takes no part in any mean or std; `scored_mask(rewards)` is the mask a
  recipe ANDs into its loss mask so the sample gives no gradient at all (nor a KL term). A group
  with fewer than 2 scored samples carries no signal: all its advantages are 0.
* **Flat groups are exactly zero.** A group whose scored rewards are all equal gets advantage
  exactly 0.0 for any constant (not a float residue of the mean divided by std + eps), so its
  loss and gradient are exactly 0. Statistics are taken in float64; results come back in the
  rewards' dtype.

Everything here runs without gradient: advantages are targets, not functions of the policy.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MovingAverageBaseline",
    "leave_one_out",
    "group_normalized",
    "zero_std_groups",
    "scored_mask",
    "gae",
    "whiten",
    "GROUP_SCALES",
]

GROUP_SCALES = ("group", "batch", "none")


def scored_mask(rewards: torch.Tensor) -> torch.Tensor:
    """Bool tensor shaped like `rewards`: True where the sample was scored (not NaN). A recipe
    ANDs it into its per-sample loss mask (`loss_mask & scored_mask(r)[:, None]` for (B, T))."""
    return ~torch.isnan(rewards)


class MovingAverageBaseline:
    """Exponential moving average of the mean reward, used as a REINFORCE baseline.

        b_k = alpha * b_{k-1} + (1 - alpha) * mean(r_k),   b_0 = init
        A_k = r_k - b_k

    The baseline is updated *before* the advantages are taken (as the seed algorithm
    prescribes), so the current batch's mean already contributes with weight (1 - alpha). The
    first update starts from b_0 = init (0.0 by default; no bias correction), so with alpha close
    to 1 the early baselines lean towards init. alpha = 0 is the batch mean; alpha = 1 is the
    constant init.

    Source: the reinforcement-comparison baseline of REINFORCE (Williams 1992, Machine Learning
    8). Raises ValueError for alpha outside [0, 1], and from `update` for empty rewards.

    Kept as a Python float (float64) so `state_dict()` / `load_state_dict()` resume exactly.
    Under data parallelism pass the global batch mean as `update(rewards, mean=...)` so that all
    ranks hold the same baseline.
    """

    def __init__(self, alpha: float, init: float = 0.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._value = float(init)
        self.steps = 0

    @property
    def value(self) -> float:
        """The current baseline b_k (reward units)."""
        return self._value

    @torch.no_grad()
    def update(self, rewards: torch.Tensor, mean: float | torch.Tensor | None = None) -> torch.Tensor:
        """Fold the batch mean into the baseline, then return rewards - baseline (shape of rewards).

        NaN rewards (unscored samples) are left out of the mean and get advantage 0. `mean`: the
        global mean of the scored rewards (data parallelism); NaN there, or a batch without a
        single scored reward, leaves the baseline unchanged."""
        if rewards.numel() == 0 and mean is None:
            raise ValueError("MovingAverageBaseline.update got an empty rewards tensor")
        ok = scored_mask(rewards)
        if mean is None:
            m = float(rewards.double()[ok].mean()) if bool(ok.any()) else float("nan")
        else:
            m = float(mean)
        if m == m:  # not NaN: something was scored
            self._value = self.alpha * self._value + (1.0 - self.alpha) * m
        self.steps += 1
        adv = rewards.double() - self._value
        return torch.where(ok, adv, torch.zeros_like(adv)).to(rewards.dtype)

    def state_dict(self) -> dict:
        """{"value", "alpha", "steps"}: plain Python numbers, so a checkpoint restores b_k exactly."""
        return {"value": self._value, "alpha": self.alpha, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restores value and step count; alpha stays as constructed (the config decides it)."""
        self._value = float(state["value"])
        self.steps = int(state.get("steps", 0))


def _grouped(rewards: torch.Tensor, group_size: int, what: str) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{what}: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"{what}: group_size must be >= 2 (with one sample per prompt every advantage is 0), "
                         f"got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{what}: batch of {rewards.numel()} rewards is not a multiple of group_size={group_size}")
    return rewards.view(-1, group_size)


def _group_stats(r: torch.Tensor):
    """For (n_groups, G) rewards with NaN = missing: (float64 rewards with 0 at NaN, scored mask,
    scored count per group, scored mean per group (0 without any), live = the group has >= 2
    scored samples that are not all equal, i.e. it carries a signal)."""
    ok = scored_mask(r)
    x = torch.where(ok, r.double(), torch.zeros((), dtype=torch.float64))
    k = ok.sum(-1, keepdim=True)
    mean = x.sum(-1, keepdim=True) / k.clamp(min=1)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    hi = torch.where(ok, x, -inf).amax(-1, keepdim=True)
    lo = torch.where(ok, x, inf).amin(-1, keepdim=True)
    live = (k >= 2) & (hi > lo)
    return x, ok, k, mean, live


@torch.no_grad()
def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages (Kool et al. 2019; Ahmadian et al. 2024):

        A_i = r_i - mean_{j != i, j in group(i), j scored} r_j = k/(k-1) (r_i - mean_scored)

    rewards: (B,) contiguous groups of `group_size` (>= 2); NaN = not scored. k = scored samples
    of the group. Returns (B,) in the rewards' dtype: 0 for unscored samples, for groups with
    k < 2, and exactly 0 for groups whose scored rewards are all equal.
    Papers: Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; RLOO for
    LLMs, Ahmadian et al. 2024, arXiv:2402.14740. Raises ValueError for rewards that are not
    1-D, group_size < 2, or a batch that is not a multiple of group_size.
    """
    r = _grouped(rewards, group_size, "leave_one_out")
    x, ok, k, _, live = _group_stats(r)
    others = (x.sum(-1, keepdim=True) - x) / (k - 1).clamp(min=1)
    adv = torch.where(ok & live, x - others, torch.zeros((), dtype=torch.float64))
    return adv.to(rewards.dtype).reshape(-1)


@torch.no_grad()
def group_normalized(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024), centred on the group mean:

        A_i = (r_i - mean_group) / (s + eps)

      scale="group":  s = the group's sample std (unbiased, n - 1)      (GRPO)
      scale="batch":  s = sample std of all scored rewards of the batch (more robust to easy/hard prompts)
      scale="none":   A_i = r_i - mean_group, no division               (Dr. GRPO, Liu et al. 2025)

    Means and stds use the scored samples only (NaN = not scored, advantage 0). A group whose
    scored rewards are all equal, or that has fewer than 2 of them, gets advantage exactly 0 in
    every scale, so it gives no gradient; find such groups with `zero_std_groups` (dynamic
    sampling drops them). Example: [NaN, 1, 0, 0] -> [0, 1.1547, -0.5774, -0.5774].
    group_size must be >= 2: with one sample per prompt every advantage would be 0, which is an
    error here rather than a silent no-op.
    rewards: (B,) contiguous groups. Returns (B,) in the rewards' dtype, unitless for group /
    batch scale.
    Papers: GRPO, Shao et al. 2024, arXiv:2402.03300; Dr. GRPO, Liu et al. 2025,
    arXiv:2503.20783. Raises ValueError for an unknown scale and as `leave_one_out` for the layout.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(GROUP_SCALES)}")
    r = _grouped(rewards, group_size, "group_normalized")
    x, ok, k, mean, live = _group_stats(r)
    zero = torch.zeros((), dtype=torch.float64)
    centred = torch.where(ok & live, x - mean, zero)
    if scale == "group":
        var = (centred * centred).sum(-1, keepdim=True) / (k - 1).clamp(min=1)
        centred = centred / (var.sqrt() + eps)
    elif scale == "batch":
        flat = x[ok]
        std = float(flat.std(unbiased=True)) if flat.numel() > 1 else 0.0
        centred = centred / (std + eps)
    return centred.to(rewards.dtype).reshape(-1)


@torch.no_grad()
def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_groups,) bool: True for groups with no learning signal: their scored (non-NaN) rewards
    are all equal, or fewer than 2 samples were scored (zero advantage under any group-centred
    estimator; DAPO's dynamic sampling filters them). Exact equality, no tolerance.
    `.repeat_interleave(group_size)` gives the per-sample mask.
    DAPO: Yu et al. 2025, arXiv:2503.14476. Raises ValueError as `leave_one_out` for the layout."""
    r = _grouped(rewards, group_size, "zero_std_groups")
    return ~_group_stats(r)[4].squeeze(-1)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) over response
    tokens, as PPO uses it (arXiv:1707.06347).

        delta_t = r_t + gamma V_{t'} - V_t        t' = the next masked position after t
        A_t     = delta_t + gamma lam A_{t'}
        returns = A + V

    rewards, values, mask: (B, T). The episode of row b is its masked positions in order; the
    step after the last masked token is terminal (V = 0, A = 0), so right padding, and anything
    after the response, is never bootstrapped from. Unmasked positions inside a row are skipped
    (not steps): rewards placed there are ignored, so put the reward on the last real token.
    Returns (advantages, returns), both (B, T) in reward units, 0 where mask is 0. Shapes must
    agree (torch raises otherwise).
    """
    m = mask.bool() if mask.dtype != torch.bool else mask
    r = rewards.detach().to(values.dtype)
    v = values.detach()
    B, T = v.shape
    adv = torch.zeros_like(v)
    next_value = torch.zeros(B, dtype=v.dtype, device=v.device)
    next_adv = torch.zeros(B, dtype=v.dtype, device=v.device)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(mt, a, torch.zeros_like(a))
        # Only masked positions advance the recursion; unmasked ones carry the state through.
        next_value = torch.where(mt, v[:, t], next_value)
        next_adv = torch.where(mt, a, next_adv)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    returns = torch.where(m, adv + v, zero)
    return adv, returns


@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           reduce=None) -> torch.Tensor:
    """Standardise x over its (masked) entries:

        y = (x - mean) / sqrt(var + eps)          (+ mean back when shift_mean=False)

    mean and var (unbiased, n - 1; population variance when n = 1) are taken over entries where
    mask is true (all entries when mask is None), in float64. `reduce` (a float64 tensor -> its
    sum over processes, e.g. an all-reduce) makes them the moments of every process's entries.
    Masked-out entries of the result are 0, and all of it is 0 when no entry is masked in; when
    every masked entry is equal the result is exactly 0 there (x with shift_mean=False), not a
    rounding residue scaled by 1/sqrt(eps). Across processes "equal" means each process's entries
    are equal and the float64 variance is at rounding level (< 1e-30 relative). x, mask: same
    shape, any. Used for PPO's advantage whitening (as in OpenAI baselines ppo2; Engstrom et al.
    2020, arXiv:2005.12729).
    """
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    reduce = reduce or (lambda t: t)
    xd = x.double()
    n, total = reduce(torch.tensor([float(m.sum()), float(xd[m].sum())], dtype=torch.float64)).tolist()
    if n == 0:
        return torch.zeros_like(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    vals = xd[m]
    mean = total / n
    sq, varied = reduce(torch.tensor([float(((vals - mean) ** 2).sum()),
                                      float(vals.numel() > 0 and bool(vals.max() != vals.min()))],
                                     dtype=torch.float64)).tolist()
    var = sq / (n - 1) if n > 1 else sq / n
    if varied == 0 and var <= 1e-30 * (1.0 + mean * mean):  # constant: exactly 0, no residue
        return torch.where(m, x if not shift_mean else zero, zero)
    y = (xd - mean) / math.sqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(m, y.to(x.dtype), zero)
