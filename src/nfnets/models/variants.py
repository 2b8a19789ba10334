"""The variant tables of the NF model families, as data, in the official vocabulary.

Sources: nfnets/base.py (`nfnet_params`, `nf_regnet_params`) and nfnets/nf_resnet.py
(`variant_dict`) of google-deepmind/deepmind-research. A new variant is one row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class NFNetVariant:
    """One row of the official ``nfnet_params`` table."""

    depths: tuple[int, int, int, int]
    train_size: int
    test_size: int
    ra_level: str  # RandAugment level: '405' = 4 layers, magnitude 5 (nfnets/base.py nfnet_params)
    drop_rate: float
    widths: tuple[int, int, int, int] = (256, 512, 1536, 1536)


# nfnets/base.py nfnet_params; paper Table 1 lists F0–F6, F7 exists only in the code.
NFNET_VARIANTS: dict[str, NFNetVariant] = {
    "F0": NFNetVariant((1, 2, 6, 3), 192, 256, "405", 0.2),
    "F1": NFNetVariant((2, 4, 12, 6), 224, 320, "410", 0.3),
    "F2": NFNetVariant((3, 6, 18, 9), 256, 352, "410", 0.4),
    "F3": NFNetVariant((4, 8, 24, 12), 320, 416, "415", 0.4),
    "F4": NFNetVariant((5, 10, 30, 15), 384, 512, "415", 0.5),
    "F5": NFNetVariant((6, 12, 36, 18), 416, 544, "415", 0.5),
    "F6": NFNetVariant((7, 14, 42, 21), 448, 576, "415", 0.5),
    "F7": NFNetVariant((8, 16, 48, 24), 480, 608, "415", 0.5),
}
# The '+' variants are the base rows with wider stages (nfnets/base.py; paper App. A.5).
NFNET_VARIANTS.update({
    f"{key}+": replace(row, widths=(384, 768, 2048, 2048))
    for key, row in list(NFNET_VARIANTS.items())
})


@dataclass(frozen=True)
class NFRegNetVariant:
    """One row of the official ``nf_regnet_params`` table (widths before the ×0.75 width)."""

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    train_size: int
    test_size: int
    drop_rate: float


# nfnets/base.py nf_regnet_params.
NF_REGNET_VARIANTS: dict[str, NFRegNetVariant] = {
    "B0": NFRegNetVariant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    "B1": NFRegNetVariant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    "B2": NFRegNetVariant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    "B3": NFRegNetVariant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    "B4": NFRegNetVariant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    "B5": NFRegNetVariant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    "B6": NFRegNetVariant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    "B7": NFRegNetVariant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    "B8": NFRegNetVariant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}

# nfnets/nf_resnet.py variant_dict: blocks per stage.
NF_RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
    600: (50, 50, 50, 50),
}
# The NF-ResNet experiments use the base experiment's 224 px for training and evaluation
# (nfnets/experiment.py); the official variant table has no sizes or dropout.
NF_RESNET_IMAGE_SIZE = 224
