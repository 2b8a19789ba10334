"""A content digest inside the safetensors weights files nfnets writes.

A weights file travels alone (uploaded, copied, attached to a release), so its digest lives in
its own safetensors metadata (key ``content_sha256``) rather than in a sidecar. It is the
SHA-256 of everything the file means: every other metadata entry, and for each tensor (by name)
its name, dtype, shape and bytes. A flipped byte in tensor data changes the bytes; one in the
header changes a name, dtype, shape, offset (then the file no longer parses or the bytes move)
or a metadata value; one in the digest itself no longer matches. Only the header's padding
spaces carry no meaning, and are not covered. (Training checkpoints use a whole-file SHA-256
manifest instead: see ``nfnets.checkpoint``.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from .errors import CheckpointError

__all__ = ["DIGEST_KEY", "tensors_digest", "with_digest", "verify_tensors"]

DIGEST_KEY = "content_sha256"


def tensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Hex SHA-256 of ``metadata`` (minus the digest key) and every tensor's name, dtype,
    shape and bytes, in name order (independent of how the file lays them out)."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode())
        data = tensor.cpu().contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def with_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                ) -> dict[str, str]:
    """``metadata`` plus its ``content_sha256`` entry, for writing with ``tensors``."""
    return {**metadata, DIGEST_KEY: tensors_digest(tensors, metadata)}


def verify_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   source: object) -> None:
    """Raise CheckpointError if the stored digest does not match what was read.

    A file without a digest (written before digests, or by another program) is accepted:
    there is nothing to check it against.
    """
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        return
    if tensors_digest(tensors, metadata) != expected:
        raise CheckpointError(f"{source}: content SHA-256 does not match the digest recorded "
                              "in the file; it was damaged after it was written (disk or "
                              "transfer error). Download or copy it again")

