"""benchmarks/gpu_families.py on tiny stand-ins on the CPU: the code path the GPU run takes."""

import importlib.util
import json
from pathlib import Path

from imagic.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


def test_families_benchmark_runs_tiny_on_the_cpu_and_projects_to_the_preset(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_families",
                                                  ROOT / "benchmarks" / "gpu_families.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--device", "cpu", "--families", "sdxl", "deepfloyd-if",
                       "--modes", "default", "24gb", "--steps", "16", "--out",
                       str(tmp_path)]) == 0
    report = json.loads((tmp_path / "families.json").read_text())
    runs = {(r["family"], r["mode"]): r for r in report["runs"]}
    assert set(runs) == {(f, m) for f in ("sdxl", "deepfloyd-if") for m in ("default", "24gb")}
    for (family, mode), run in runs.items():
        assert run["fits"] and run["memory_cap_gib"] is None  # no cap without CUDA
        assert run["finetune"] == ("lora" if mode == "24gb" else "full")
        short, long = run["measured"]
        assert (short["stage1_steps"], long["stage1_steps"]) == (16, 32)
        # projected to the preset's own step counts, from the two runs' difference
        steps = get_preset(family).finetune_steps
        per_step = (long["stage2_s"] - short["stage2_s"]) / 16
        assert per_step > 0
        fixed = max(short["stage2_s"] - 16 * per_step, 0.0)
        assert abs(run["projected"]["stage2_s"] - (fixed + steps * per_step)) < 0.05
        assert run["projected"]["generate_s"] == long["generate_s"]
    table = bench.table(report)
    assert table.count("\n| sdxl |") == 2 and "| deepfloyd-if | low-memory | lora |" in table
