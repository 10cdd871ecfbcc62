"""What the tiny-checkpoint tests check about written files: a digest of a folder's bytes, and
which floating-point tensors are constant (a tiny checkpoint must have none)."""

from __future__ import annotations

import hashlib
import pathlib

from safetensors import safe_open


def digest(root: pathlib.Path) -> str:
    """One hash of every file's relative path and bytes under `root`."""
    sha = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha.update(path.relative_to(root).as_posix().encode() + b"\0")
        sha.update(hashlib.sha256(path.read_bytes()).digest())
    return sha.hexdigest()


def constant_tensors(files: list[pathlib.Path]) -> list[str]:
    """`folder/name` of each floating-point tensor of `files` whose elements are all equal.

    A one-element tensor (e.g. a depth head's single output bias) is trivially "constant";
    it is non-zero and that is all it can be, so it is not listed.
    """
    constant = []
    for path in files:
        with safe_open(path, "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor = tensors.get_tensor(name)
                if not tensor.is_floating_point() or tensor.numel() == 1:
                    continue
                if bool((tensor == tensor.flatten()[0]).all()):
                    constant.append(f"{path.parent.name}/{name}")
    return constant
