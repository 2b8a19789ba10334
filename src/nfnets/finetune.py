"""The fine-tuning preset: what ``nfnets train --init-from WEIGHTS`` uses for the values a
run leaves unset.

From the paper (App. A.4–A.5, ImageNet fine-tuning of the JFT-300M-pretrained NFNets; the
official code has no fine-tuning experiment):

* learning rate 0.1 at batch 2048, linear warm-up for the first 5,000 of 15,000 steps (a
  third of the run), then cosine decay;
* weight decay 1e-5 (pre-training on ImageNet: 2e-5);
* dropout 0.25 and stochastic depth 0.1 (whatever the variant's pre-training values);
* an EMA of the weights (its decay is not stated: ours stays at the recipe's 0.99999 with the
  TF1 warm-up min(decay, (1+t)/(10+t)), which follows the weights closely in a short run);
* SAM with ρ = 0.05 — not implemented here; the preset trains without it.

Our choices, for a folder of a few thousand images rather than ImageNet (not from the paper):

* the learning rate stays 0.1 whatever the batch (the paper gives the one value). Scaling it
  linearly with the batch, as the pre-training rule 0.1 · B/256 does, starves small-data
  runs: on the digits transfer of docs/finetuning.md it gives 0.003 at batch 64, which
  reached 44% top-1 where 0.1 reached 84% (benchmarks/finetune_digits.py, one seed);
* batch 64 and 10 epochs with the same one-third warm-up, instead of 15,000 steps at 2048;
* augmentation ``none`` (random-resized crop and flip only: the paper's JFT pre-training
  used crop and flip only, and its fine-tuning augmentation is not stated);
* AGC (λ = 0.01, classifier excluded), Nesterov momentum 0.9 and label smoothing 0.1 stay as
  in the recipe.
"""

from __future__ import annotations

__all__ = ["FINETUNE_PRESET", "finetune_preset"]

PAPER_BATCH = 2048  # paper App. A.5: ImageNet fine-tuning batch
PAPER_LR = 0.1  # at PAPER_BATCH
PAPER_WARMUP_FRACTION = 5_000 / 15_000  # warm-up steps / total steps

#: The preset's values (see the module docstring for where each comes from).
FINETUNE_PRESET: dict[str, float | int | str] = {
    "weight_decay": 1e-5,  # paper
    "drop_rate": 0.25,  # paper
    "stochdepth_rate": 0.1,  # paper
    "lr": PAPER_LR,  # paper's value, not scaled with the batch (ours)
    "epochs": 10,  # ours (paper: 15,000 steps at batch 2048)
    "batch_size": 64,  # ours (paper: 2048)
    "augment": "none",  # ours (paper: not stated)
}


def finetune_preset(batch_size: int | None = None, epochs: int | None = None
                    ) -> dict[str, float | int | str]:
    """The preset for a given batch size and run length (None: the preset's own), with the
    paper's warm-up over the first third of the run."""
    preset = dict(FINETUNE_PRESET)
    batch = batch_size or int(preset["batch_size"])
    length = epochs or int(preset["epochs"])
    preset.update(batch_size=batch, epochs=length, warmup_epochs=PAPER_WARMUP_FRACTION * length)
    return preset
