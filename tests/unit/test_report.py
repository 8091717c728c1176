"""The report builder on synthetic run folders (finished, diverged, in progress, a demo folder),
and the HTML page rendered in headless Chromium: no console errors, table and figures present,
the table sorts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from alignkit.eval.report import build_report
from alignkit.errors import UserError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(d: Path, losses, rewards, finished=True, evals=()):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("data: prompts.jsonl\nmodel: base\n")
    with (d / "metrics.jsonl").open("w") as f:
        for i, (l, r) in enumerate(zip(losses, rewards), start=1):
            f.write(json.dumps({"step": i, "kind": "train", "loss": l, "reward_mean": r, "kl": 0.01 * i,
                                "elapsed_s": 2.0 * i, "peak_rss_mb": 500 + i, "generated_tokens": 100 * i}) + "\n")
        for step, acc in evals:
            f.write(json.dumps({"step": step, "kind": "eval", "eval_solved": acc, "eval_reward": acc}) + "\n")
    if finished:
        (d / "config.json").write_text("{}")
    return d


@pytest.fixture()
def runs(tmp_path):
    ok = _run(tmp_path / "grpo", [1.0, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], evals=[(2, 0.3), (4, 0.5)])
    bad = _run(tmp_path / "rloo", [1.0, 5.0, "nan"], [0.1, 0.0, 0.0], finished=False)
    live = _run(tmp_path / "ppo", [1.0, 0.9], [0.1, 0.15], finished=False)
    return ok, bad, live


def test_rows_statuses_and_figures(runs, tmp_path):
    ok, bad, live = runs
    res = build_report([ok, bad, live], tmp_path / "out")
    by = {r["method"]: r for r in res["rows"]}
    assert by["grpo"]["status"] == "finished" and by["grpo"]["accuracy"] == 0.5
    assert by["grpo"]["peak_rss_mb"] == 504 and by["grpo"]["generated_tokens"] == 400
    assert by["rloo"]["status"] == "diverged" and by["rloo"]["diverged"] == 1
    assert by["ppo"]["status"] == "in progress"
    assert set(res["figures"]) == {"reward", "accuracy", "kl"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| grpo |" in md and "diverged" in md and "in progress" in md
    for name in res["figures"]:
        assert (tmp_path / "out" / f"curve_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_folder_aggregates_seeds(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    runs = {}
    for s, acc in enumerate([0.4, 0.5, 0.6]):
        d = _run(demo / f"grpo-s{s}", [1.0, 0.5], [0.2, 0.4])
        runs[f"grpo-s{s}"] = {"method": "grpo", "seed": s, "dir": str(d), "returncode": 0, "wall_s": 10.0 + s,
                              "needs": "prompts + reward",
                              "eval": {"accuracy": acc, "accuracy_t1": acc / 2, "format_rate": 1.0, "reward": acc, "kl_token": 0.01,
                                       "samples": ["Итого: 5 рублей."]}}
    runs["ppo-s0"] = {"method": "ppo", "seed": 0, "dir": str(demo / "ppo-s0"), "returncode": 3, "diverged": True,
                      "error": "loss is nan", "needs": "prompts + reward"}
    (demo / "results.json").write_text(json.dumps({"runs": runs}))
    res = build_report([demo], demo)
    by = {r["method"]: r for r in res["rows"]}
    assert by["grpo"]["accuracy"] == pytest.approx(0.5) and by["grpo"]["spread"] == pytest.approx(0.1)
    assert by["grpo"]["accuracy_t1"] == pytest.approx(0.25) and by["grpo"]["spread_t1"] == pytest.approx(0.05)
    assert "exact accuracy (samples, T=1)" in res["table_text"]
    assert by["grpo"]["wall_s"] == pytest.approx(11.0)
    assert by["ppo"]["status"] == "failed" and by["ppo"]["diverged"] == 1


def _demo_folder(root: Path) -> Path:
    """A demo folder like `alignkit demo` writes: a cached base, SFT, GRPO (logs KL while training),
    REINFORCE and RS (no KL while training, a KL at the end), with sample answers."""
    demo = root / "demo"
    demo.mkdir()
    prompts = ["Хлеб: 55\nМолоко: 80", "Сыр: 300\nЧай: 40"]
    refs = ["Итого: 135 рублей.", "Итого: 340 рублей."]

    def ev(acc, kl, answers, right):
        return {"accuracy": acc, "accuracy_t1": acc / 2, "format_rate": 1.0, "reward": acc + 0.05, "kl_token": kl,
                "samples": [{"prompt": p, "ref_answer": r, "completion": a, "correct": ok}
                            for p, r, a, ok in zip(prompts, refs, answers, right)]}

    runs = {"base": {"name": "base", "dir": str(root / "cache" / "base"), "returncode": 0, "cached": True,
                     "wall_s": 129.4, "needs": "toy text (pretraining)",
                     "eval": ev(0.0, 0.0, ["Всего 5", "Всего 5"], [False, False])},
            "sft": {"name": "sft", "dir": str(demo / "sft"), "returncode": 0, "wall_s": 22.0,
                    "needs": "demonstrations", "eval": ev(0.488, 0.0, refs, [True, True])}}
    _run(demo / "sft", [2.0, 1.0], [0.0, 0.0])
    (demo / "sft" / "eval_greedy").mkdir()
    (demo / "sft" / "eval_greedy" / "eval.json").write_text(json.dumps({"n_prompts": 500}))
    for name, kl_curve in (("grpo", True), ("reinforce", False), ("rs", False)):
        d = _run(demo / name, [1.0, 0.8, 0.6], [0.3, 0.4, 0.5], evals=[(3, 0.55)])
        (d / "config.yaml").write_text("data: prompts.jsonl\neval_data: eval.jsonl\neval_prompts: 100\n")
        if not kl_curve:  # drop the logged KL: this method has none while training
            recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
            (d / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kl"}) + "\n"
                                                     for r in recs))
        runs[name] = {"method": name, "seed": 0, "dir": str(d), "returncode": 0, "wall_s": 30.0,
                      "needs": "prompts + reward", "eval": ev(0.55, 0.02, [refs[0], "Итого: 330 рублей."],
                                                              [True, False])}
    (demo / "results.json").write_text(json.dumps({"runs": runs}, ensure_ascii=False))
    return demo


def test_demo_report_plots_are_labelled_coloured_and_complete(tmp_path):
    from alignkit.eval.report import METHOD_COLORS

    demo = _demo_folder(tmp_path)
    res = build_report([demo], demo)
    legend = res["legend"]
    assert set(legend) == {"reward", "accuracy", "kl"}
    # every method with a KL is on the KL plot, those without a training curve as end markers
    assert {"grpo", "reinforce", "rs"} <= set(legend["kl"]["lines"])
    # the accuracy plot names the data it uses (100 in-training prompts), distinct from the table's 500
    assert "first 100 held-out prompts" in legend["accuracy"]["title"]
    # the SFT baseline is a line on every plot, labelled with what it was measured on
    for name, fig in legend.items():
        base = [lab for lab in fig["lines"] if lab.startswith("SFT baseline")]
        assert base, name
        if name != "kl":
            assert "500 held-out prompts" in base[0], base
    assert any("0.488" in lab for lab in legend["accuracy"]["lines"])
    # one fixed colour per method across all plots
    for fig in legend.values():
        for lab, colour in fig["lines"].items():
            if lab in METHOD_COLORS:
                assert colour == METHOD_COLORS[lab], (lab, colour)
    page = (demo / "report.html").read_text()
    for m in ("grpo", "reinforce", "rs", "sft"):
        assert f'background:{METHOD_COLORS[m]}' in page, m  # the same colour marks the method in the tables
    # samples: the prompt, the correct answer, each model's answer and whether it is right
    md = (demo / "report.md").read_text()
    assert "| # | prompt | correct answer | base | sft | grpo | reinforce | rs |" in md
    assert "Итого: 340 рублей." in md and "`Итого: 330 рублей.` ✗" in md and "`Итого: 135 рублей.` ✓" in md
    assert "Хлеб: 55" in page and "✗ wrong" in page and "✓ right" in page
    # the cached base model shows what building it took, marked as cached (not 0)
    assert "129 (cached build)" in res["table_text"]


def test_run_curves_png_draws_only_the_curves_a_user_reads(tmp_path):
    from alignkit.training.logging import CURVE_PANELS, plot_metrics

    recs = [{"step": i, "kind": "train", "loss": 1.0 / i, "reward_mean": 0.1 * i, "kl": 0.01 * i, "entropy": 1.0,
             "grad_norm": 0.5, "clip_frac": 0.1, "value_loss": 0.2, "lr": 1e-5, "units": 64, "peak_rss_mb": 700,
             "ppo_epoch": i % 2, "tokens_per_s": 100.0, "elapsed_s": float(i)} for i in range(1, 6)]
    recs.append({"step": 5, "kind": "eval", "eval_solved": 0.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        seen["titles"] = [ax.get_title() for ax in fig.axes if ax.get_title()]
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert plot_metrics(path, tmp_path / "curves.png") is not None
    finally:
        plt.Figure.savefig = real_savefig
    assert seen["titles"] == [t for t, _ in CURVE_PANELS]  # 8 panels, in order
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        build_report([tmp_path / "empty"], tmp_path)
    with pytest.raises(UserError, match="not a run folder"):
        build_report([tmp_path / "missing"], tmp_path)


CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var t = document.querySelector('table.sortable');
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  var th = t.querySelectorAll('th');
  var col = Array.prototype.findIndex.call(th, function (h) { return h.textContent === 'peak memory (MiB)'; });
  th[col].click();
  var first = t.tBodies[0].rows[0].cells[0].textContent;
  th[col].click();
  var firstDesc = t.tBodies[0].rows[0].cells[0].textContent;
  document.body.setAttribute('data-check', JSON.stringify({rows: t.tBodies[0].rows.length, images: imgs.length,
    loaded: loaded, asc: first, desc: firstDesc}));
});
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_renders_in_headless_chromium(runs, tmp_path):
    ok, bad, live = runs
    out = tmp_path / "out"
    build_report([ok, bad, live], out)
    page = (out / "report.html").read_text()
    assert "<img" in page and "data:image/png;base64," in page and "src=\"curve_" not in page  # self-contained
    checked = out / "checked.html"
    checked.write_text(page.replace("</body>", CHECK_JS + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--window-size=1280,900"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    marker = dom.stdout.split('data-check="', 1)[1].split('"', 1)[0].replace("&quot;", '"')
    check = json.loads(marker)
    assert check["rows"] == 3 and check["images"] == 3 and check["loaded"]
    assert check["asc"] == "ppo" and check["desc"] == "grpo"  # peak memory 502 < 503 < 504
    shot = tmp_path / "shot.png"
    res = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000


LAYOUT_JS = """
<script>
window.addEventListener('load', function () {
  var heads = Array.prototype.map.call(document.querySelectorAll('table.samples th'), function (h) {
    return h.textContent; });
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-check', JSON.stringify({
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    images: imgs.length, loaded: imgs.every(function (i) { return i.complete && i.naturalWidth > 0; }),
    figure_px: Math.min.apply(null, imgs.map(function (i) { return i.getBoundingClientRect().width; })),
    sample_heads: heads, verdicts: document.querySelectorAll('table.samples td.right, table.samples td.wrong').length,
    swatches: document.querySelectorAll('.sw').length}));
});
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
def test_demo_report_layout_in_headless_chromium(tmp_path, width):
    """At desktop and phone widths: the page never scrolls sideways as a whole (wide tables and
    figures scroll in their own boxes), figures stay readable (>= 700 px), the samples table has
    the prompt, the correct answer and a right/wrong mark per model answer."""
    demo = _demo_folder(tmp_path)
    build_report([demo], demo)
    checked = demo / "checked.html"
    checked.write_text((demo / "report.html").read_text().replace("</body>", LAYOUT_JS + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--hide-scrollbars", f"--window-size={width},900"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = json.loads(dom.stdout.split('data-check="', 1)[1].split('"', 1)[0].replace("&quot;", '"'))
    assert check["overflow"] <= 1, check
    assert check["images"] == 3 and check["loaded"] and check["figure_px"] >= 700, check
    assert check["sample_heads"][:3] == ["#", "prompt", "correct answer"]
    assert check["sample_heads"][3:] == ["base", "sft", "grpo", "reinforce", "rs"]
    assert check["verdicts"] == 2 * 5 and check["swatches"] >= 10
