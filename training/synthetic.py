"""A deterministic synthetic dataset in the LLaVA-JSON layout: PIL-drawn scenes of coloured shapes.

Each scene places 1 to 4 shapes (circle, square, triangle, cross) of 4 colours in the cells of a 2x2 grid. Stage 1
gets a caption per scene; stage 2 gets questions about colour, shape, position and count, whose answers each come
from 4 choices (chance 0.25), plus a few text-only conversations. A held-out split of new scenes is kept for
evaluation, with each record's `question_type`.

Every question comes before its image (`"What shape is at the top left?<image>"`): a Mamba reads left to right and
keeps a fixed-size state, so knowing the question lets it keep what the question needs while it reads the image.

    python -m training.synthetic OUTPUT_DIR [--train-scenes 1500] [--heldout-scenes 100] [--seed 0]
"""

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("1", "2", "3", "4")
QUESTION_TYPES = ("colour", "shape", "position", "count")
# Every question type answers with one of 4 choices.
CHANCE = {question_type: 0.25 for question_type in QUESTION_TYPES}
TEXT_ONLY = [
    ("Which colours can the shapes have?", "red, green, blue or yellow"),
    ("Which shapes can a picture hold?", "circles, squares, triangles and crosses"),
    ("How many cells does a picture have?", "4"),
]


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    position: str

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}"


def draw_scene(items: list[Item], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    cell = size // 2
    margin = max(1, cell // 6)
    for item in items:
        row, column = divmod(POSITIONS.index(item.position), 2)
        left, top = column * cell + margin, row * cell + margin
        right, bottom = left + cell - 2 * margin, top + cell - 2 * margin
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif item.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif item.shape == "triangle":
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
        else:
            third = (right - left) / 3
            draw.rectangle((left + third, top, right - third, bottom), fill=fill)
            draw.rectangle((left, top + third, right, bottom - third), fill=fill)
    return image


def random_scene(rng: random.Random) -> list[Item]:
    """1 to 4 objects in distinct cells, each a different colour-shape pair (so "the red circle" is unambiguous)."""
    count = rng.randint(1, 4)
    positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    pairs = rng.sample([(colour, shape) for colour in COLOURS for shape in SHAPES], count)
    return [Item(colour, shape, position) for (colour, shape), position in zip(pairs, positions, strict=True)]


def caption(items: list[Item]) -> str:
    phrases = [item.phrase for item in items]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def questions(items: list[Item], rng: random.Random) -> list[tuple[str, str, str]]:
    """One (question_type, question, answer) per type, about a random object of the scene."""
    item, target = rng.choice(items), rng.choice(items)
    return [
        ("colour", f"What colour is the shape at the {item.position}?", item.colour),
        ("shape", f"What shape is at the {item.position}?", item.shape),
        ("position", f"Where is the {target.colour} {target.shape}?", target.position),
        ("count", "How many shapes are there?", str(len(items))),
    ]


def turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def generate(
    output_dir: str | Path, train_scenes: int = 1500, heldout_scenes: int = 100, seed: int = 0, size: int = 32
):
    """Write `images/`, `captions.json` (stage 1), `conversations.json` (stage 2) and `heldout.json`."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, conversations, heldout = [], [], []
    for index in tqdm(range(train_scenes + heldout_scenes), desc="Drawing scenes", unit="scene"):
        items = random_scene(rng)
        name = f"images/{index:06d}.png"
        draw_scene(items, size).save(output_dir / name)
        held_out = index >= train_scenes
        if not held_out:
            captions.append(
                {
                    "id": f"caption-{index}",
                    "image": name,
                    "conversations": turn("<image>\nDescribe the picture.", caption(items)),
                }
            )
        for question_type, question, answer in questions(items, rng):
            record = {"id": f"scene-{index}-{question_type}", "image": name, "question_type": question_type}
            record["conversations"] = turn(question + "<image>", answer)
            (heldout if held_out else conversations).append(record)
    for number, (question, answer) in enumerate(TEXT_ONLY):
        conversations.append({"id": f"text-{number}", "conversations": turn(question, answer)})
    for name, records in (("captions", captions), ("conversations", conversations), ("heldout", heldout)):
        (output_dir / f"{name}.json").write_text(json.dumps(records, indent=1))
    return output_dir


def texts(output_dir: str | Path) -> list[str]:
    """Every text of the dataset, to train its tokenizer on."""
    records = []
    for name in ("captions", "conversations", "heldout"):
        records += json.loads((Path(output_dir) / f"{name}.json").read_text())
    return [
        message["value"].replace("<image>\n", "").replace("<image>", "")
        for record in records
        for message in record["conversations"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--heldout-scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"Dataset written to {generate(args.output_dir, args.train_scenes, args.heldout_scenes, args.seed)}")


if __name__ == "__main__":
    main()
