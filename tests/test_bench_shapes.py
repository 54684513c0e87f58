"""ShapesBench: its cases are fair (one attribute changed, inputs are renders), every method
is scored from the same seeds, and a stopped run resumes without redoing finished cases."""

import csv
import json
from pathlib import Path

import pytest

from imagic.bench.shapes import KINDS, make_cases
from imagic.cli import main
from imagic.shapes import detect, render

RUN4 = Path(__file__).resolve().parent.parent / "docs" / "bench" / "shapes-run4"  # 80 × 3 rows


def test_cases_change_exactly_one_attribute_of_a_render():
    cases = make_cases(40)
    assert [c.kind for c in cases[:4]] == list(KINDS)
    assert make_cases(8) == cases[:8]  # seeded per case: a smaller set is a prefix
    for case in cases:
        assert list(case.target) == [case.kind]
        assert case.target[case.kind] != case.source.attributes[case.kind]
        assert detect(render(case.source)).attributes == case.source.attributes
        words = case.text.split()
        assert case.target[case.kind].split()[0] in words


def test_smoke_run_writes_rows_summary_and_plot_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "shapes", "--cases", "2", "--seeds", "0", "--out", str(out),
            "--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "3",
            "--eta", "0,1", "--strengths", "0.5", "--quiet"]
    assert main(args) == 0
    with (out / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    # per case: imagic and no-finetune at 2 η, auto-η's pick, no-embedding once, SDEdit at 1
    # strength, text-only
    assert len(rows) == 2 * (2 + 1 + 2 + 1 + 1 + 1)
    assert {r["method"] for r in rows} == {"imagic", "imagic-auto", "no-finetune",
                                          "no-embedding", "sdedit", "text-only"}
    for auto in (r for r in rows if r["method"] == "imagic-auto"):  # one of imagic's outputs
        same = [r for r in rows if r["method"] == "imagic" and r["case"] == auto["case"]
                and r["param"] == auto["param"]]
        assert [{**r, "method": "imagic-auto"} for r in same] == [auto]
        assert auto["margin"] != "" and auto["distance"] != ""  # the signals behind the pick
    assert all(r["margin"] == "" for r in rows if r["method"] not in ("imagic", "imagic-auto"))
    assert all(0 <= float(r["ssim"]) <= 1 and float(r["psnr"]) > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| colour | imagic |" in summary and "| size | sdedit |" in summary
    assert "Auto-η against the oracle" in summary and "| all |" in summary
    assert (out / "tradeoff.png").stat().st_size > 0
    assert main(args) == 0  # finished cases are not redone
    with (out / "rows.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    args[args.index("--cases") + 1] = "3"
    assert main(args) == 0  # one more case adds only its rows
    with (out / "rows.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows) * 3 // 2


def test_methods_subset_runs_only_those_and_a_rerun_adds_missing_methods(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "shapes", "--cases", "1", "--seeds", "0", "--out", str(out),
            "--strengths", "0.5", "--sample-steps", "2", "--quiet"]
    assert main([*args, "--methods", "sdedit"]) == 0
    assert main([*args, "--methods", "sdedit,text-only"]) == 0  # only text-only is new
    with (out / "rows.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["sdedit", "text-only"]
    # the same folder with another recipe would mix two runs: one line, exit 2
    assert main([*args[:-3], "--sample-steps", "3", "--quiet", "--methods", "sdedit"]) == 2
    assert "other settings" in capsys.readouterr().err
    (out / "rows.csv").write_text("not,a,bench\n1,2\n")
    assert main([*args, "--methods", "sdedit"]) == 2
    assert "not a ShapesBench rows.csv" in capsys.readouterr().err


def test_imagic_inversion_runs_on_request_and_only_with_ddim(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "shapes", "--cases", "1", "--seeds", "0", "--out", str(out),
            "--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "3", "--eta", "0,1",
            "--quiet", "--methods", "imagic-inversion", "--guidance", "2"]
    assert main([*args, "--sampler", "dpm++"]) == 2
    assert "drop it from --methods" in capsys.readouterr().err and not out.exists()
    # the other methods take any sampler, although the shapes preset starts from the inversion
    other = ["bench", "shapes", "--cases", "1", "--seeds", "0", "--out", str(tmp_path / "o"),
             "--sample-steps", "3", "--quiet", "--methods", "text-only", "--sampler", "dpm++"]
    assert main(other) == 0
    # the protocol's guidance (4), not the shapes preset's (2), unless --guidance says otherwise
    assert json.loads((tmp_path / "o" / "run.json").read_text())["config"]["guidance"] == 4.0
    assert main(args) == 0
    with (out / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["param"])) for r in rows] == [("imagic-inversion", 0.0),
                                                               ("imagic-inversion", 1.0)]
    assert "| colour | imagic-inversion |" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["config"]["guidance"] == 2.0


def test_a_stopped_run_keeps_its_finished_cases_and_summarises_them(tmp_path, monkeypatch):
    import imagic.bench.shapes as bench

    finished = []

    def run_case_then_stop(*args, **kwargs):
        if finished:
            raise KeyboardInterrupt  # Ctrl-C during the second case
        finished.append(1)
        return real(*args, **kwargs)

    real = bench.run_case
    monkeypatch.setattr(bench, "run_case", run_case_then_stop)
    out = tmp_path / "bench"
    args = ["bench", "shapes", "--cases", "3", "--seeds", "0", "--methods", "text-only",
            "--sample-steps", "2", "--out", str(out), "--quiet"]
    assert main(args) == 130
    with (out / "rows.csv").open() as f:
        assert [r["case"] for r in csv.DictReader(f)] == ["0"]
    assert (out / "summary.md").read_text().startswith("# ShapesBench: 1 cases × 1 seeds")
    assert (out / "tradeoff.png").stat().st_size > 0
    monkeypatch.setattr(bench, "run_case", real)
    assert main(args) == 0  # resumed: cases 1 and 2 only
    with (out / "rows.csv").open() as f:
        assert [r["case"] for r in csv.DictReader(f)] == ["0", "1", "2"]


def test_from_case_holds_out_the_first_cases(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--cases", "3", "--from-case", "2", "--seeds", "0",
                 "--methods", "text-only", "--sample-steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    with (out / "rows.csv").open() as f:
        assert [r["case"] for r in csv.DictReader(f)] == ["2"]
    assert main(["bench", "shapes", "--cases", "3", "--from-case", "3", "--out",
                 str(tmp_path / "x")]) == 2


def test_recipe_flags_reach_the_run_record(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--cases", "1", "--seeds", "0", "--methods", "text-only",
                 "--sample-steps", "2", "--timesteps-per-step", "16",
                 "--finetune-timesteps-per-step", "8", "--embed-lr", "0.05", "--out", str(out),
                 "--quiet"]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["timesteps_per_step"], config["finetune_timesteps_per_step"]) == (16, 8)
    assert config["embed_lr"] == 0.05 and config["sample_steps"] == 2


def test_rows_file_with_other_columns_is_refused_and_commits_are_whole(tmp_path):
    import pytest

    from imagic.bench import append_rows
    from imagic.errors import InputError

    path = tmp_path / "rows.csv"
    with append_rows(path, ("a", "b")) as commit:
        commit([{"a": 1, "b": 2}, {"a": 3, "b": 4}])
    assert path.read_text().splitlines() == ["a,b", "1,2", "3,4"]
    with append_rows(path, ("a", "b")) as commit:  # appending keeps one header
        commit([{"a": 5, "b": 6}])
    assert path.read_text().splitlines()[-1] == "5,6" and path.read_text().count("a,b") == 1
    with pytest.raises(InputError, match="columns of another imagic version"), \
            append_rows(path, ("a", "b", "c")):
        pass


def test_a_run_recorded_before_a_config_field_existed_still_resumes(tmp_path):
    import json
    from dataclasses import replace
    from types import SimpleNamespace

    import pytest

    from imagic.bench import check_same_run
    from imagic.errors import InputError
    from imagic.presets import get_preset

    backend = SimpleNamespace(identity={"family": "pixel-cascade", "fingerprint": "abc"})
    config = replace(get_preset("shapes"), start="noise")  # as ShapesBench records it
    check_same_run(tmp_path, {"etas": [0.5], "config": config.to_dict()}, backend)
    record = json.loads((tmp_path / "run.json").read_text())
    del record["config"]["sampler"]  # as written by a version without the field
    (tmp_path / "run.json").write_text(json.dumps(record))
    check_same_run(tmp_path, {"etas": [0.5], "config": config.to_dict()}, backend)
    with pytest.raises(InputError, match="other settings"):  # the default is what it ran with
        check_same_run(tmp_path, {"etas": [0.5],
                                  "config": replace(config, sampler="dpm++").to_dict()}, backend)


def test_merging_parallel_workers_adds_each_new_row_once_and_refuses_doubles(tmp_path, capsys):
    """`imagic bench merge RUN W1 W2`: each worker's new rows once, in case order; an output
    that two workers both made is one line, exit 2."""
    import shutil

    source = RUN4
    with (source / "rows.csv").open() as f:
        lines = f.read().splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    per_case = [r for r in rows if r.startswith("0,")], [r for r in rows if r.startswith("1,")]
    per_case += ([r for r in rows if r.startswith("2,")],)

    def folder(name, *cases):
        path = tmp_path / name
        path.mkdir()
        shutil.copy(source / "run.json", path)
        (path / "rows.csv").write_text(header + "".join(r for c in cases for r in per_case[c]))
        return path

    run = folder("run", 0)
    w1, w2 = folder("w1", 0, 1), folder("w2", 0, 2)  # each started from a copy of the run
    assert main(["bench", "merge", str(run), str(w1), str(w2)]) == 0
    with (run / "rows.csv").open() as f:
        assert [r["case"] for r in csv.DictReader(f)] == [
            "0"] * len(per_case[0]) + ["1"] * len(per_case[1]) + ["2"] * len(per_case[2])
    assert (run / "summary.md").read_text().startswith("# ShapesBench: 3 cases")
    w3 = folder("w3", 0, 1)
    assert main(["bench", "merge", str(folder("run2", 0)), str(w1), str(w3)]) == 2
    assert "repeats" in capsys.readouterr().err


@pytest.fixture
def fits(monkeypatch) -> list:
    """One entry per `Imagic.fit` (stages 1-2) the test runs."""
    from imagic.editor import Imagic

    calls = []
    fit = Imagic.fit
    monkeypatch.setattr(Imagic, "fit", lambda self, *a, **k: calls.append(1) or fit(self, *a, **k))
    return calls


def test_several_guidance_scales_fit_once_and_name_each_scale(tmp_path, fits):
    """`--guidance 1,2` samples every method at each scale from one fit per case, in rows
    named METHOD-gG, and the summary shows Imagic along η at each."""
    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--cases", "1", "--seeds", "0", "--out", str(out),
                 "--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "2",
                 "--eta", "0,1", "--methods", "imagic,text-only", "--guidance", "1,2",
                 "--quiet"]) == 0
    with (out / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(fits) == 1
    assert sorted({r["method"] for r in rows}) == ["imagic-g1", "imagic-g2", "text-only-g1",
                                                   "text-only-g2"]
    assert len(rows) == 2 * (2 + 1)
    summary = (out / "summary.md").read_text()
    assert "imagic-g1 along η" in summary and "imagic-g2 along η" in summary
    assert json.loads((out / "run.json").read_text())["guidances"] == [1.0, 2.0]


def test_tables_print_the_results_tables_and_refuse_rows_given_twice(capsys):
    rows = str(RUN4 / "rows.csv")
    assert main(["bench", "tables", rows, "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "complete (case, seed) pairs" in printed and "seeds 0 -->" in printed
    for title in ("imagic along η", "sdedit along strength", "SDEdit bar, all cases",
                  "held-out cases 16–79", "Per seed, on the same cases"):
        assert title in printed, title
    assert main(["bench", "tables", rows, rows]) == 2
    assert "more than one row" in capsys.readouterr().err


def test_forgedit_methods_re_render_imagics_one_fit(tmp_path, fits):
    """imagic-vp, imagic-attention and forget-STRATEGY re-render Imagic's session (one fit per
    case): at η = 0 vector projection is e_opt and attention interpolation is the e_opt branch,
    so their outputs are Imagic's; forgetting the encoder is not."""
    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--cases", "1", "--seeds", "0", "--out", str(out),
                 "--embed-steps", "2", "--finetune-steps", "4", "--finetune-lr", "1e-3",
                 "--sample-steps", "2", "--eta", "0,1",
                 "--methods", "imagic,imagic-vp,imagic-attention,forget-noencoder",
                 "--quiet"]) == 0
    with (out / "rows.csv").open() as f:
        rows = {(r["method"], float(r["param"])): r for r in csv.DictReader(f)}
    assert len(fits) == 1 and len(rows) == 8
    assert rows["imagic-vp", 0.0]["psnr"] == rows["imagic", 0.0]["psnr"]
    assert rows["imagic-attention", 0.0]["success"] == rows["imagic", 0.0]["success"]
    assert abs(float(rows["imagic-attention", 0.0]["psnr"])
               - float(rows["imagic", 0.0]["psnr"])) < 0.5
    assert rows["forget-noencoder", 0.0]["psnr"] != rows["imagic", 0.0]["psnr"]
    assert "| forget-noencoder |" in (out / "summary.md").read_text()


def test_auto_forget_is_compared_with_the_oracle_over_every_swept_strategy():
    from imagic.bench.shapes import auto_forget_comparison

    def row(case, method, eta, success, psnr=20.0, forget=""):
        return {"case": case, "seed": 0, "kind": "colour", "method": method, "param": eta,
                "success": success, "psnr": psnr, "forget": forget}

    rows = [row(0, "imagic", 0.8, 0), row(0, "imagic", 0.9, 0), row(0, "forget-noencoder", 0.8, 1),
            row(0, "imagic-auto", 0.9, 0, 25.0), row(0, "imagic-auto-forget", 0.8, 1, 22.0,
                                                      "noencoder"),
            row(1, "imagic", 0.8, 1), row(1, "forget-noencoder", 0.8, 1),
            row(1, "imagic-auto", 0.8, 1, 24.0), row(1, "imagic-auto-forget", 0.8, 0, 21.0,
                                                      "noencoder")]
    table = auto_forget_comparison(rows)["all"]
    assert table["n"] == 2 and table["auto"] == 0.5 and table["oracle"] == 1.0
    assert table["auto_eta"] == 0.5 and table["oracle_eta"] == 0.5
    assert table["psnr"] == 21.5 and table["psnr_eta"] == 24.5
    assert table["picked"] == {"noencoder": 2}
