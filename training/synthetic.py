"""A deterministic synthetic dataset in the LLaVA-JSON layout: PIL-drawn scenes of coloured shapes.

Each scene draws 1 to 4 copies of one shape (circle, square, triangle or cross) in one colour (red, green, blue or
yellow) in distinct cells of a 2x2 grid. Stage 1 gets a caption per scene. Stage 2 gets questions about the colour,
the shape and the count, and about the position (where the shape is, in scenes with one shape; which cell is empty,
in scenes with three): each answer is one of 4 choices (chance 0.25). A few text-only conversations are mixed in.
The held-out scenes show layouts (colour, shape and occupied cells together) that no training scene shows, and
every image is jittered (shade, tint, size, offset); held-out records carry their `question_type`.

Every question comes before its image (`"What shape is in the picture?<image>"`): a Mamba reads left to right and
keeps a fixed-size state, so knowing the question lets it keep what the question needs while it reads the image.

    vlmamba synthetic OUTPUT_DIR [--train-scenes 1500] [--heldout-scenes 100] [--seed 0]
"""

import argparse
import json
import random
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vlmamba.cli import run_tool

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
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


def draw_scene(items: list[Item], size: int, rng: random.Random) -> Image.Image:
    """The scene with random jitter (background shade, colour tint, size and offset), so no two images are equal."""
    shade = rng.randint(232, 250)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = size // 2
    for item in items:
        margin = rng.randint(max(1, cell // 10), max(1, cell // 4))
        row, column = divmod(POSITIONS.index(item.position), 2)
        dx, dy = (rng.randint(-margin // 2, margin // 2) for _ in range(2))
        left, top = column * cell + margin + dx, row * cell + margin + dy
        right, bottom = left + cell - 2 * margin, top + cell - 2 * margin
        fill = tuple(min(255, max(0, channel + rng.randint(-20, 20))) for channel in COLOURS[item.colour])
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


def layouts(rng: random.Random, heldout_fraction: float = 0.1) -> tuple[list[tuple], list[tuple]]:
    """Every (colour, shape, occupied cells) layout, split into training and held-out ones: held-out scenes show
    layouts never seen in training (each colour, shape and cell pattern was, in other combinations)."""
    cells = [tuple(p for p, used in zip(POSITIONS, bits, strict=True) if used) for bits in product((0, 1), repeat=4)]
    every = [(colour, shape, where) for colour in COLOURS for shape in SHAPES for where in cells if where]
    rng.shuffle(every)
    cut = round(len(every) * heldout_fraction)
    return every[cut:], every[:cut]


def scene(layout: tuple) -> list[Item]:
    colour, shape, where = layout
    return [Item(colour, shape, position) for position in where]


def caption(items: list[Item]) -> str:
    places = [f"the {item.position}" for item in items]
    where = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
    number = ("A", "Two", "Three", "Four")[len(items) - 1]
    plural = "" if len(items) == 1 else ("es" if items[0].shape == "cross" else "s")
    return f"{number} {items[0].colour} {items[0].shape}{plural} at {where}."


def questions(items: list[Item]) -> list[tuple[str, str, str]]:
    """(question_type, question, answer) for each question the scene answers unambiguously."""
    asked = [
        ("colour", "What colour are the shapes?", items[0].colour),
        ("shape", "What shape is in the picture?", items[0].shape),
        ("count", "How many shapes are there?", str(len(items))),
    ]
    if len(items) == 1:
        asked.append(("position", "Where is the shape?", items[0].position))
    elif len(items) == 3:
        empty = next(position for position in POSITIONS if position not in {item.position for item in items})
        asked.append(("position", "Which cell is empty?", empty))
    return asked


def turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def generate(
    output_dir: str | Path, train_scenes: int = 1500, heldout_scenes: int = 100, seed: int = 0, size: int = 32
):
    """Write `images/`, `captions.json` (stage 1), `conversations.json` (stage 2) and `heldout.json`."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    training_layouts, heldout_layouts = layouts(rng)
    captions, conversations, heldout = [], [], []
    for index in tqdm(range(train_scenes + heldout_scenes), desc="Drawing scenes", unit="scene"):
        held_out = index >= train_scenes
        layout = rng.choice(heldout_layouts if held_out else training_layouts)
        items = scene(layout)
        name = f"images/{index:06d}.png"
        draw_scene(items, size, rng).save(output_dir / name)
        if not held_out:
            captions.append(
                {
                    "id": f"caption-{index}",
                    "image": name,
                    "conversations": turn("<image>\nDescribe the picture.", caption(items)),
                }
            )
        for question_type, question, answer in questions(items):
            record = {"id": f"scene-{index}-{question_type}", "image": name, "question_type": question_type}
            record["layout"] = {"colour": layout[0], "shape": layout[1], "cells": list(layout[2])}
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


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir")
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--heldout-scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"Dataset written to {generate(args.output_dir, args.train_scenes, args.heldout_scenes, args.seed)}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
