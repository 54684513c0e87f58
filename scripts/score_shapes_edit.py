"""Score an `imagic edit` of a shipped example with the ShapesWorld detectors.

Reads OUT/manifest.json (written by `imagic edit`), finds the example's scene (the inputs under
examples/ are renders of known scenes, scripts/make_examples.py), and prints one line per output
and a summary: the target attribute read, the other attributes kept, the input's pebbles kept
(`imagic.shapes.evaluate.check_edit`), background PSNR.

    make edit && .venv/bin/python scripts/score_shapes_edit.py imagic-out
"""

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_examples import EXAMPLES  # noqa: E402

from imagic.shapes import parse_caption, sample_scene  # noqa: E402
from imagic.shapes.evaluate import check_edit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="imagic-out", help="the edit's output folder")
    args = parser.parse_args()
    out = Path(args.out)
    manifest = json.loads((out / "manifest.json").read_text())
    name = Path(manifest["image"]).stem
    known = {n: (seed, attrs) for n, seed, attrs in EXAMPLES}
    if name not in known:
        print(f"error: {manifest['image']} is not one of the shipped examples", file=sys.stderr)
        return 2
    seed, attrs = known[name]
    source = sample_scene(seed, **attrs)
    asked = {k: v for k, v in parse_caption(manifest["text"]).items() if v is not None}
    target = {k: v for k, v in asked.items() if v != source.attributes[k]}
    print(f"{name}: {manifest['text']!r} asks for {target}")
    counts = {"target": 0, "target_and_kept": 0, "all_and_pebbles": 0}
    entries = [e for e in manifest["images"] if not e.get("auto")]  # auto-η copies one of them
    for entry in entries:
        c = check_edit(Image.open(out / entry["file"]), source, target)
        counts["target"] += c["target"]
        counts["target_and_kept"] += c["target"] and c["kept"]
        counts["all_and_pebbles"] += c["target"] and c["kept"] and c["pebbles"]
        print(f"  η {entry['eta']:.2f} seed {entry['seed']}: read {c['detected']}; target "
              f"{'yes' if c['target'] else 'no'}, others kept {'yes' if c['kept'] else 'no'}, "
              f"pebbles {c['pebbles_found']}/{c['pebbles_expected']} kept + {c['pebbles_added']} "
              f"new, background PSNR {c['background_psnr']:.1f} dB")
    n = len(entries)
    print(f"target read {counts['target']}/{n}; with the other attributes kept "
          f"{counts['target_and_kept']}/{n}; and the pebbles kept too "
          f"{counts['all_and_pebbles']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
