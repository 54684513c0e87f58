"""Write the example images shipped in the package (src/imagic/assets/examples, which the
repository's examples/ links to): ShapesWorld renders (never model samples), each saved 4×
larger with nearest-neighbour so it is a normal ≥ 64 px picture that imagic reduces back to the
exact 32×32 render. Run: python scripts/make_examples.py"""

from pathlib import Path

from PIL import Image

from imagic.shapes import caption, render, sample_scene
from imagic.shapes.world import EXAMPLES


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "src" / "imagic" / "assets" / "examples"
    out.mkdir(exist_ok=True)
    for name, (seed, attributes) in EXAMPLES.items():
        scene = sample_scene(seed, **attributes)
        image = Image.fromarray(render(scene)).resize((128, 128), Image.Resampling.NEAREST)
        image.save(out / f"{name}.png")
        print(f"{name}.png: {caption(scene)}")


if __name__ == "__main__":
    main()
