"""The whole toy pipeline, scaled down, as a user runs it: data.py toy → sft.py → grpo.py → infer.py
--benchmark → evaluate.py, each a real subprocess with the project's own commands. It checks that
every stage wrote what the next one reads, not that the model learned (that takes minutes: README).
And the shipped toy checkpoint: `infer.py --demo` loads it offline and it replies on a new toy video."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import reward  # noqa: E402


def run(*cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd[0]} failed:\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_toy_pipeline_end_to_end(tmp_path):
    data, sft, grpo = tmp_path / "toy", tmp_path / "sft", tmp_path / "grpo"
    out = run("data.py", "toy", "--out", str(data), "--n-train", "4", "--n-rl", "2", "--n-test", "2", "--nqna-frac", "0")
    assert "test: 2 videos" in out
    run("sft.py", "--toy", "--data", str(data / "train" / "sft.jsonl"), "--out", str(sft), "--epochs", "2")
    assert (sft / "final" / "model.safetensors").exists()
    out = run("grpo.py", "--toy", "--init", str(sft / "final"), "--anno", str(data / "rl" / "anno.json"),
              "--out", str(grpo), "--max-steps", "2", "--episodes", "1", "--max-new-tokens", "8")
    steps = [json.loads(line) for line in open(grpo / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1, 2] and all(s["judge_failures"] == 0 for s in steps)
    assert (grpo / "final" / "model.safetensors").exists()
    for name, model in (("sft", sft), ("grpo", grpo)):
        preds = tmp_path / f"preds-{name}.jsonl"
        run("infer.py", "--benchmark", str(data / "test" / "anno.json"), "--videos", str(data / "test" / "videos"),
            "--model", str(model / "final"), "--interval", "2", "--frames-per-turn", "2", "--max-new-tokens", "8",
            "--out", str(preds))
        lines = [json.loads(line) for line in open(preds)]
        assert sorted(p["question_id"] for p in lines) == ["test_0000", "test_0001"]
        report = tmp_path / f"eval-{name}.json"
        run("evaluate.py", "--gold", str(data / "test" / "anno.json"), "--pred", str(preds),
            "--judge", "offline", "--json", str(report))
        r = json.load(open(report))
        assert r["examples"] == 2 and not r["skipped"] and r["judge_failures"] == 0
        assert sorted(r["pauc"]) == ["0.0", "0.5", "1.0"]
        # the script's number is the metric's, recomputed here from the files by reward.pauc_metric
        gold = reward.load_gold(data / "test" / "anno.json")
        replies = evaluate.load_predictions(preds, {ex["question_id"] for ex in gold})
        for w, v in r["pauc"].items():
            assert v == pytest.approx(100 * reward.pauc_metric(gold, replies, reward.OfflineJudge(), float(w)))


def test_shipped_toy_model_replies_on_a_toy_video(tmp_path):
    out = run("infer.py", "--demo", "3", "--html", str(tmp_path / "demo.html"))
    gold = re.findall(r"gold \[([\d:.]+)-", out)
    replies = re.findall(r"^\[(\d\d):(\d\d(?:\.\d)?)\] (.+)$", out, re.M)
    assert gold and replies, out
    assert re.search(r"\d+ turns, [1-9]\d* replies", out)
    page = (tmp_path / "demo.html").read_text()  # the demo's timeline page: its gold events and its replies
    assert page.count('class="span"') == len(gold) and page.count('class="reply"') == len(replies)
