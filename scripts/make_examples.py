"""Write the example images shipped in the package (src/imagic/assets/examples, which the
repository's examples/ links to): renders (never model samples). ShapesWorld's are saved 4×
larger with nearest-neighbour, so each is a normal ≥ 64 px picture that imagic reduces back to
the exact 32×32 render; ShapesWorld 2's at their own 128 px, each with the text of its edit.
Run: python scripts/make_examples.py"""

from pathlib import Path

from PIL import Image

from imagic import shapes2
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
    for name in shapes2.world.EXAMPLES:
        source, target = shapes2.world.example_scenes(name)
        Image.fromarray(shapes2.render(source)).save(out / f"{name}.png")
        print(f"{name}.png: {shapes2.caption(source, prefix=0)!r}; its edit: "
              f"{shapes2.caption(target, prefix=0)!r}")


if __name__ == "__main__":
    main()
