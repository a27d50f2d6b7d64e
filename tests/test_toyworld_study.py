"""bench/toyworld.py cannot rot: the whole study at `--scale smoke`, its report and its resume (issue 7).

The study itself is a benchmark (its numbers are in bench/toyworld_report/); this runs every step
for a few iterations and checks what the report is built from, not the numbers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longalign.reward import auto_text_irrelevant_weight

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"1", "0.3", "0", "auto"}
EXTENDED = {"1", "0.3", "auto"}


def study(out: Path, *flags: str) -> subprocess.CompletedProcess:
    """The smoke study into `out`, given as a path relative to its parent (as users type it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "bench" / "toyworld.py"), "--scale", "smoke", "--out", out.name, *flags]
    return subprocess.run(
        command, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )


def new_logged_steps(source: Path, target: Path) -> set[int]:
    """Steps logged by `target`'s own training: its event files that are not copies of `source`'s."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    copied = {f.relative_to(source) for f in source.rglob("events.out.tfevents.*")}
    steps: set[int] = set()
    for event_file in target.rglob("events.out.tfevents.*"):
        if event_file.relative_to(target) not in copied:
            accumulator = EventAccumulator(str(event_file))
            accumulator.Reload()
            steps |= {e.step for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)}
    return steps


def test_smoke_study_reports_both_claims_and_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "study"
    first = study(out)
    assert first.returncode == 0, first.stdout[-4000:]
    report = out / "report"
    results = json.loads((report / "results.json").read_text())
    for name in ("base", "aligned", "aligned_truncated"):
        assert set(results[name]["0"]) >= {"before", "straddles", "after", "hallucination", "preference"}, name
    assert set(results["reward"]) == WEIGHTS
    for weight, run in results["reward"].items():
        assert {"score", "score_text_relevant", "score_text_irrelevant", "eta", "text_relevant_norm"} <= set(run["curves"])
        assert [step for step, _ in run["curves"]["score"]] == [1, 2], weight  # smoke: 2 optimizer steps
        assert set(run["eval"]["0"]["preference"]) == {"score", "text_relevant", "text_irrelevant"}
    auto = results["reward"]["auto"]["curves"]  # w = auto follows each step's eta (METHOD.md §4)
    for (_, eta), (_, used) in zip(auto["eta"], auto["text_irrelevant_weight"], strict=True):
        assert used == pytest.approx(auto_text_irrelevant_weight(eta), rel=1e-4)
    text = (report / "REPORT.md").read_text()
    assert "| w | w used | score |" in text
    for weight in WEIGHTS:
        assert f"| w = {weight} |" in text and f"\n| {weight} | " in text
    assert (report / "reward_curves.png").stat().st_size > 0 and (report / "reward_w0.3.png").exists()

    # Cut the study off inside the last reward run: its final/ and evaluation are gone.
    shutil.rmtree(out / "runs" / "reward-toy-w0" / "final")
    del results["reward"]["0"]["eval"]
    for name in ("reward_stage_toy-w0", "eval_reward_w0", "total_this_run"):
        del results["timings_s"][name]
    (report / "results.json").write_text(json.dumps(results))
    second = study(out)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resuming" in second.stdout
    assert second.stdout.count("run_unet.sh reward done") == 1 and "run_unet.sh align done" not in second.stdout
    assert "clip step" not in second.stdout and "base unet step" not in second.stdout
    resumed = json.loads((report / "results.json").read_text())
    assert "eval" in resumed["reward"]["0"] and resumed["aligned"] == results["aligned"]
    assert {k: resumed["timings_s"][k] for k in results["timings_s"]} == results["timings_s"]

    other = study(out, "--seed", "1")  # another study into the same folder is refused, nothing touched
    assert other.returncode != 0 and "another scale or seed" in other.stdout
    assert json.loads((report / "results.json").read_text()) == resumed

    # w = 1, 0.3 and auto continued from their step-2 checkpoints to 4 steps: only steps 3 and 4 train.
    longer = study(out, "--extend_reward", "4")
    assert longer.returncode == 0, longer.stdout[-4000:]
    assert longer.stdout.count("run_unet.sh reward done") == len(EXTENDED)
    extended = json.loads((report / "results.json").read_text())["reward_extended"]
    assert extended["steps"] == 4 and set(extended["runs"]) == EXTENDED
    for weight, run in extended["runs"].items():
        assert [step for step, _ in run["curves"]["score"]] == [1, 2, 3, 4], weight  # logs of steps 1-2 carried over
        assert run["curves"]["score"][:2] == resumed["reward"][weight]["curves"]["score"], weight
        assert set(run["eval"]["0"]["preference"]) == {"score", "text_relevant", "text_irrelevant"}
        assert new_logged_steps(out / "runs" / f"reward-toy-w{weight}", out / "runs" / f"reward-toy-w{weight}-to4") == {3, 4}
    text = (report / "REPORT.md").read_text()
    assert "### Continued to 4 steps" in text and "| w = 0.3 | 2 |" in text and "| w = 0.3 | 4 |" in text
    assert (report / "reward_curves_to4.png").stat().st_size > 0
    refused = study(out, "--extend_reward", "2")
    assert refused.returncode != 0 and "must exceed" in refused.stdout
