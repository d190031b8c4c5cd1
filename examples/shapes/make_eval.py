"""Write the demo's held-out evaluation set: 50 images per label, in ImageFolder layout.

    python -m examples.shapes.make_eval config/eval/shapes

Deterministic: image i is rendered from a generator seeded by (EVAL_SEED, i), a seed no training epoch
and not the trainer's own held-out set uses, so the set measures what a checkpoint learned in general.
"""

from __future__ import annotations

import sys
from pathlib import Path

from examples.shapes.dataset import LABELS, ShapesDataset
from examples.shapes.train import atomic_write

EVAL_SEED = (104729,)
EVAL_SIZE = 200


def write_evaluation(folder: Path) -> int:
    dataset = ShapesDataset(EVAL_SIZE, EVAL_SEED)
    for label in LABELS:
        (folder / label).mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        image, label = dataset[index]
        path = folder / LABELS[label] / f"{index:03d}.png"
        atomic_write(path, lambda f, im=image: im.save(f, format="PNG", optimize=True))
    return len(dataset)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "config/eval/shapes")
    print(f"{write_evaluation(folder)} images in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
