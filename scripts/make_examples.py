"""Write the example images under examples/: ShapesWorld renders (never model samples), each
saved 4× larger with nearest-neighbour so it is a normal ≥ 64 px picture that imagic reduces
back to the exact 32×32 render. Run: python scripts/make_examples.py"""

from pathlib import Path

from PIL import Image

from imagic.shapes import caption, render, sample_scene

# (file name, seed, fixed attributes, the target text of the edit shown in the README/docs)
EXAMPLES = [
    ("large-red-circle-top-left", 3,
     dict(shape="circle", colour="red", size="large", position="top left")),
    ("small-yellow-square-center", 7,
     dict(shape="square", colour="yellow", size="small", position="center")),
    ("large-green-triangle-bottom-right", 11,
     dict(shape="triangle", colour="green", size="large", position="bottom right")),
]


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "examples"
    out.mkdir(exist_ok=True)
    for name, seed, attributes in EXAMPLES:
        scene = sample_scene(seed, **attributes)
        image = Image.fromarray(render(scene)).resize((128, 128), Image.Resampling.NEAREST)
        image.save(out / f"{name}.png")
        print(f"{name}.png: {caption(scene)}")


if __name__ == "__main__":
    main()
