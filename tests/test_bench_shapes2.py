"""ShapesBench 2: its cases are fair (one edit of a render, which the target's own render
passes and the input fails), the tuning and held-out sets differ, and the runner scores a
cascade's methods, the ablation without the super-resolution fine-tune included, resumably."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagic.bench.shapes2 import KINDS, select_cases
from imagic.cli import main
from imagic.shapes.train import TrainConfig
from imagic.shapes2 import render
from imagic.shapes2.model import CascadeConfig
from imagic.shapes2.train import CascadeTrainer

TINY = CascadeConfig(base_channels=(8, 16, 16), sr_channels=(8, 8, 16, 16), norm_num_groups=4,
                     text_hidden_size=16, text_layers=1, text_heads=2, attention_head_dim=4,
                     sr_sample_steps=2)


def test_cases_are_one_edit_of_a_render_that_its_target_render_passes():
    cases = select_cases(20)
    assert [c.kind for c in cases[:5]] == list(KINDS)
    assert select_cases(10) == cases[:10]  # seeded per case: a smaller set is a prefix
    assert select_cases(12, start=10) == cases[10:12]
    for case in cases:
        done = case.check(Image.fromarray(render(case.target)))
        assert done["success"] and done["identity"] and done["pebbles"], (case.kind, done)
        assert not case.check(case.image())["target"], case.kind
    held_out = select_cases(20, held_out=True)
    assert {repr(c.source) for c in held_out}.isdisjoint(repr(c.source) for c in cases)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench2") / "run"
    CascadeTrainer(TrainConfig(out=str(out), steps=2, batch_size=2, checkpoint_every=2,
                               sample_every=0, sample_steps=2, model=TINY, quiet=True,
                               device="cpu")).run()
    yield out / "model"
    torch.set_num_threads(threads)


def test_bench_on_a_cascade_runs_shapesbench_2_with_the_sr_ablation(cascade, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "shapes", "--model", str(cascade), "--cases", "5", "--seeds", "0",
            "--out", str(out), "--embed-steps", "1", "--finetune-steps", "1",
            "--aux-finetune-steps", "1", "--sample-steps", "2", "--eta", "0,1",
            "--strengths", "0.5", "--methods", "imagic,no-sr-finetune,sdedit", "--quiet"]
    assert main(args) == 0
    with (out / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == set(KINDS)
    assert len(rows) == 5 * (2 + 2 + 1)
    assert all(r["identity"] in ("0", "1") for r in rows)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# ShapesBench 2: 5 cases × 1 seeds")
    assert "| pose | no-sr-finetune |" in summary and "| remove | sdedit |" in summary
    # success needs identity here: the summary shows it beside the success it gates
    assert "| identity kept |" in summary and "| success (all three) |" in summary
    assert main(args) == 0  # finished cases are not redone
    with (out / "rows.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_shapesbench_2_runs_the_preset_as_an_edit_does_unless_told_otherwise(
        cascade, tmp_path, capsys):
    """Imagic and its ablations start where the model's preset starts (shapes2: the input's
    inversion) at the preset's guidance; --start and --guidance change that."""
    from imagic.presets import get_preset

    preset = get_preset("shapes2")
    args = ["bench", "shapes", "--model", str(cascade), "--cases", "1", "--seeds", "0",
            "--embed-steps", "1", "--finetune-steps", "1", "--aux-finetune-steps", "1",
            "--sample-steps", "2", "--eta", "1", "--methods", "imagic", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "preset")]) == 0
    config = json.loads((tmp_path / "preset" / "run.json").read_text())["config"]
    assert (config["start"], config["guidance"]) == (preset.start, preset.guidance)
    assert main([*args, "--out", str(tmp_path / "paper"), "--start", "noise",
                 "--guidance", "3"]) == 0
    config = json.loads((tmp_path / "paper" / "run.json").read_text())["config"]
    assert (config["start"], config["guidance"]) == ("noise", 3.0)
    # imagic already starts from the inversion: the method that forces it would be a copy
    args[-2] = "imagic,imagic-inversion"
    assert main([*args, "--out", str(tmp_path / "twice")]) == 2
    assert "imagic-inversion" in capsys.readouterr().err and not (tmp_path / "twice").exists()


def test_the_sr_ablation_needs_a_cascade(tmp_path, capsys):
    args = ["bench", "shapes", "--cases", "1", "--seeds", "0", "--out", str(tmp_path / "b"),
            "--sample-steps", "2", "--methods", "no-sr-finetune", "--quiet"]
    assert main(args) == 2
    assert "no-sr-finetune" in capsys.readouterr().err
    assert main([*args[:-3], "--held-out", "--quiet"]) == 2  # held-out: ShapesBench 2 only


def test_tables_give_what_each_ablation_costs_and_the_stage_bar_with_standard_errors(
        tmp_path, capsys):
    """`imagic bench tables` on ShapesBench 2 rows: the fine-tuned stage against the stage as
    trained per η (identity, pebbles, paired difference ± standard error), and every method at
    its best parameter against Imagic's best η on the same outputs."""
    header = ["case", "kind", "method", "param", "seed", "success", "target", "kept", "pebbles",
              "psnr", "ssim", "status", "text", "margin", "distance", "forget", "identity"]
    # (method, param, per case: (success, pebbles, identity)); 4 cases of one seed
    runs = [("imagic", 0.8, [(1, 1, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1)]),
            ("no-sr-finetune", 0.8, [(0, 1, 0), (0, 0, 0), (0, 0, 0), (0, 0, 1)]),
            ("sdedit", 0.5, [(0, 0, 0)] * 4)]
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for method, param, verdicts in runs:
            for case, (success, pebbles, identity) in enumerate(verdicts):
                out.writerow([case, KINDS[case], method, param, 0, success, 1, 1, pebbles, 30.0,
                              0.9, "ok", "t", "", "", "", identity])
    assert main(["bench", "tables", str(path)]) == 0
    printed = capsys.readouterr().out
    # identity 75% against 25%: +50 points, paired differences (1, 1, 0, 0): SE 29
    assert "| 0.8 | 75% | 25% | +50 ± 29 | 50% | 25% | +25 ± 25 | 4 |" in printed
    assert "| imagic | 0.8 | 50% ± 25 | 75% | 50% | 30.00 | – | 4 |" in printed
    assert "| no-sr-finetune | 0.8 | 0% ± 0 | 25% | 25% | 30.00 | -50 ± 29 | 4 |" in printed
    assert "| sdedit | 0.5 | 0% ± 0 |" in printed and "SDEdit bar, seed 0" in printed
    assert "held-out cases 16–79" not in printed  # ShapesBench's split, not this bench's


def test_tables_judge_the_edit_bar_per_kind_and_pooled_with_each_best_setting(tmp_path, capsys):
    """The edit bar on pose, add and remove edits: Imagic's best η and SDEdit's best strength
    are picked per row (a kind, or the three pooled), colour and position never count, and the
    lead carries its paired standard error."""
    header = ["case", "kind", "method", "param", "seed", "success", "target", "kept", "pebbles",
              "psnr", "ssim", "status", "text", "margin", "distance", "forget", "identity"]
    kinds = ["pose", "pose", "add", "add", "remove", "remove", "colour"]
    success = {  # (method, param) → success per case
        ("imagic", 0.7): [1, 0, 1, 1, 0, 0, 1],
        ("imagic", 0.9): [0, 0, 0, 0, 1, 1, 1],
        ("sdedit", 0.3): [0, 0, 1, 0, 0, 0, 1],
        ("sdedit", 0.5): [1, 0, 0, 0, 0, 0, 1]}
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for (method, param), verdicts in success.items():
            for case, (kind, ok) in enumerate(zip(kinds, verdicts)):
                out.writerow([case, kind, method, param, 0, ok, 1, 1, 0, 30.0, 0.9, "ok", "t",
                              "", "", "", ok])
    assert main(["bench", "tables", str(path)]) == 0
    printed = capsys.readouterr().out
    # pose: η 0.7 (1 of 2) against strength 0.5 (the same case): no lead
    assert "| pose | η 0.7: 50% ± 35 | 0.5: 50% ± 35 | +0 ± 0 | no | 2 |" in printed
    assert "| add | η 0.7: 100% ± 0 | 0.3: 50% ± 35 | +50 ± 50 | yes | 2 |" in printed
    assert "| remove | η 0.9: 100% ± 0 | 0.3: 0% ± 0 | +100 ± 0 | yes | 2 |" in printed
    # pooled: η 0.7 (3 of 6) beats η 0.9 (2 of 6); SDEdit 1 of 6 either way; colour left out
    assert "| pose + add + remove | η 0.7: 50% ± 20 | 0.3: 17% ± 15 | +33 ± 21 | yes | 6 |" \
        in printed


@pytest.mark.parametrize("start", ["inversion", "noise"])
def test_sdedit_starts_the_super_resolution_stage_where_imagic_does(cascade, tmp_path,
                                                                    monkeypatch, start):
    """SDEdit and Imagic then differ in the base alone: from the preset's inversion start,
    SDEdit's stage starts from its inversion of the input too; text-only never reads it."""
    from imagic.backends.cascade import PixelCascadeBackend

    upsample, starts = PixelCascadeBackend.upsample, []

    def spy(self, *args, start=None, **kwargs):
        starts.append(start)
        return upsample(self, *args, start=start, **kwargs)

    monkeypatch.setattr(PixelCascadeBackend, "upsample", spy)
    assert main(["bench", "shapes", "--model", str(cascade), "--cases", "1", "--seeds", "0",
                 "--sample-steps", "2", "--strengths", "0.5", "--methods", "sdedit,text-only",
                 "--start", start, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    image = select_cases(1)[0].image()
    sdedit, text_only = starts
    assert text_only is None
    if start == "noise":
        assert sdedit is None
    else:
        assert np.array_equal(np.asarray(sdedit), np.asarray(image))
