"""The evaluation check: top-1 accuracy and per-class recall on a labelled set, against the live version's.

The images go through the real preprocessing and the model in batches of `batch.max_size`, each pass
taking its turn with serving batches (compute.run_forward), so scoring a candidate delays a request by
at most one of its batches. The set is kept encoded (a few KB an image) and decoded batch by batch.
"""

from __future__ import annotations

import torch

from .compute import run_forward
from .errors import ConfigError, InvalidImage
from .evalset import Evaluation
from .files import open_regular, shown
from .images import Preprocessor, stack_images
from .report import EvaluationResult


class EvaluationSet:
    """One model definition's evaluation images, read once, with the thresholds a candidate must meet."""

    def __init__(self, model: str, spec: Evaluation, labels: tuple[str, ...], preprocessor: Preprocessor) -> None:
        self.spec = spec
        self.labels = labels
        self.preprocessor = preprocessor
        self.images: list[tuple[str, bytes, int]] = []  # (file, encoded bytes, label index)
        for path, label in spec.files:
            try:
                with open_regular(path, follow_links=True) as fh:
                    data = fh.read()
                preprocessor.load(data)  # what a forward pass will get: fail now, as a config error
            except (OSError, InvalidImage) as exc:
                raise ConfigError(f"models.{model}.evaluation.images: {shown(path)}: {exc}") from exc
            self.images.append((path.name, data, labels.index(label)))

    def score(self, module: torch.nn.Module, batch_size: int, *, last: bool = False) -> EvaluationResult:
        """Top-1 accuracy and per-class recall of `module` on the set; `last`: a gate's last passes."""
        hits = [0] * len(self.labels)
        totals = [0] * len(self.labels)
        for start in range(0, len(self.images), batch_size):
            chunk = self.images[start : start + batch_size]
            batch = stack_images([self.preprocessor.load(data) for _, data, _ in chunk])
            final = last and start + batch_size >= len(self.images)
            predicted = run_forward(module, batch, last=final).argmax(dim=1).tolist()
            for (_, _, truth), guess in zip(chunk, predicted, strict=True):
                totals[truth] += 1
                hits[truth] += int(guess == truth)
        recall = {label: round(h / t, 4) for label, h, t in zip(self.labels, hits, totals, strict=True) if t}
        return EvaluationResult(len(self.images), round(sum(hits) / len(self.images), 4), recall)

    def tensors(self, limit: int) -> tuple[torch.Tensor, list[str]]:
        """Up to `limit` images spread evenly over the set (every label), preprocessed, with their names."""
        count = min(limit, len(self.images))
        chosen = [self.images[i * len(self.images) // count] for i in range(count)]
        tensors = stack_images([self.preprocessor.load(data) for _, data, _ in chosen])
        return tensors, [f"{self.labels[label]}/{name}" for name, _, label in chosen]

    def judge(self, result: EvaluationResult, live: EvaluationResult | None) -> tuple[EvaluationResult, str | None]:
        """The result with the live score beside it, and why it fails the bars (None when it passes)."""
        if live is not None:
            result = result.against(live)
        spec = self.spec
        if spec.min_accuracy is not None and result.accuracy < spec.min_accuracy:
            return result, f"accuracy {result.accuracy:.3f} < min_accuracy {spec.min_accuracy:.3f}"
        if spec.max_regression is not None and live is not None:
            if result.accuracy < live.accuracy - spec.max_regression:
                return result, f"accuracy {result.accuracy:.3f} < live {live.accuracy:.3f} - {spec.max_regression:g}"
        return result, None
