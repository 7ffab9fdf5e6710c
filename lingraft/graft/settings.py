"""The settings of one grafting job (``lingraft graft``, sweep jobs, compare): :class:`GraftSettings`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraftSettings"]


@dataclass
class GraftSettings:
    """What :func:`lingraft.graft.pipeline.run_graft` does; the defaults are the ``lingraft graft`` CLI's.

    ratio, eps and out_path have no default (eps None: the checkpoint's training eps; out_path None: write no
    checkpoint). Paths may be str or Path.
    """

    ratio: float
    eps: float | None
    out_path: str | None
    # selection
    rule: str = "lg"
    scope: str = "global"
    gammas: tuple = (2.0, 1.5, 1.0, 0.0)
    significance: str = "gradient"
    significance_input: str = "clean"
    score_images: int = 1000
    score_bound: str = "crown"
    init: str = "paper"
    # fine-tuning (epochs 0: none)
    epochs: int = 1
    num_train: int = 10000
    batch_size: int = 128
    lr: float = 1e-3
    lr_graft: float = 0.01
    train_eps: float | None = None  # None: eps
    # files
    scores_only: str | None = None  # write the scores JSON here and stop
    mask_path: str | None = None  # graft this saved mask instead of selecting
    save_mask: str | None = None  # also write the chosen mask here
    # before/after certification table (num_samples 0: none)
    num_samples: int = 200
    methods: tuple = ("crown", "alpha-crown")
    # data and randomness
    dataset: str | None = None
    data_dir: str | None = None
    seed: int = 0
