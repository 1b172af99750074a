"""An honest prompt-following figure for the demo: does the image look like the emoji its prompt names?

Method (nearest-neighbour retrieval, no learned judge):

1. Features: every image is average-pooled to 16×16 RGB in [-1, 1] and flattened (768 numbers). Fixed, not
   trained, so the figure cannot flatter the model; pooling forgives one-pixel shifts and fine texture.
2. For each generated image, the nearest *training* image (Euclidean distance in that space) is found, and
   its record (emoji name, subcategory) is compared with the record of the image's prompt:
   *name match* — the neighbour is the same emoji (any skin tone); *subcategory match* — it is in the same
   subcategory ("fruit", "heart", "country flag"...).
3. Chance level: the same matches against the prompts' records in random order (the mean over many random
   re-pairings, in which about one image per permutation keeps its own prompt). It answers "how often would
   these images match a prompt picked at random?", which accounts for a model that draws the same few emoji
   whatever it is asked.
4. Ceiling: the same retrieval for the *real* images of the held-out prompts (never in the training set). It
   shows how much the feature space itself can tell; for seen prompts the real image is its own neighbour.

Prompts seen in training can reach a name match; held-out prompts name emoji absent from the training set,
so for them only the subcategory match is meaningful.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FEATURE_SIDE = 16


@dataclass
class MatchRates:
    """Shares (0–1) of images whose nearest training image matches their prompt, and the chance level."""

    name: float
    subcategory: float
    chance_name: float
    chance_subcategory: float
    count: int


def features(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` images in [-1, 1] → ``(N, 768)`` average-pooled 16×16 RGB features."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}.")
    return F.adaptive_avg_pool2d(images.float(), FEATURE_SIDE).flatten(1)


def nearest(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Index of each query's nearest reference (Euclidean distance on ``features``)."""
    reference_features = features(references)
    indices = [torch.cdist(features(chunk), reference_features).argmin(1) for chunk in queries.split(batch_size)]
    return torch.cat(indices)


def match_rates(
    neighbours: list[dict], prompts: list[dict], permutations: int = 200, seed: int = 0
) -> MatchRates:
    r"""How often each neighbour's record matches its prompt's record, and the chance level.

    Args:
        neighbours (`list[dict]`): for each image, the record (``name``, ``subcategory``) of its nearest
            training image.
        prompts (`list[dict]`): for each image, the record of the prompt it was generated from.
        permutations (`int`, *optional*, defaults to 200): random re-pairings averaged for the chance level.
        seed (`int`, *optional*, defaults to 0): seed of those permutations.
    """
    if len(neighbours) != len(prompts) or not prompts:
        raise ValueError(
            f"Need one prompt per image and at least one: got {len(neighbours)} images, {len(prompts)} prompts."
        )
    if permutations < 1:
        raise ValueError(f"permutations={permutations}: the chance level needs at least one re-pairing.")

    def rate(pairs_of: list[int], key: str) -> float:
        return sum(neighbours[i][key] == prompts[j][key] for i, j in enumerate(pairs_of)) / len(prompts)

    generator = torch.Generator().manual_seed(seed)
    shuffles = [torch.randperm(len(prompts), generator=generator).tolist() for _ in range(permutations)]
    identity = list(range(len(prompts)))
    return MatchRates(
        name=rate(identity, "name"),
        subcategory=rate(identity, "subcategory"),
        chance_name=sum(rate(s, "name") for s in shuffles) / permutations,
        chance_subcategory=sum(rate(s, "subcategory") for s in shuffles) / permutations,
        count=len(prompts),
    )


def prompt_following(
    generated: torch.Tensor, prompts: list[dict], train_images: torch.Tensor, train_records: list[dict]
) -> MatchRates:
    r"""Nearest-training-image match rates of generated images against their prompts (see the module doc).

    Args:
        generated (`torch.Tensor`): `(N, 3, H, W)` images in [-1, 1], one per prompt.
        prompts (`list[dict]`): the N prompt records (``name``, ``subcategory``; from the data set's metadata).
        train_images (`torch.Tensor`): `(M, 3, H', W')` training images in [-1, 1].
        train_records (`list[dict]`): their M records.
    """
    if len(train_images) != len(train_records):
        raise ValueError(f"{len(train_images)} training images but {len(train_records)} records.")
    neighbours = [train_records[i] for i in nearest(generated, train_images).tolist()]
    return match_rates(neighbours, prompts)
