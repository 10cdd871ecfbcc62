"""The README's Stable Diffusion composition example runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest
from PIL import Image

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
MARKERS = ("<!-- README-EXAMPLE:sd-composition START -->",
           "<!-- README-EXAMPLE:sd-composition END -->")


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    start, end = (text.index(marker) for marker in MARKERS)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)
    assert len(blocks) == 1, "the sd-composition section should hold one python block"
    return blocks[0]


def test_readme_example_runs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # it writes its checkpoint and image to the working directory
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    source, image = namespace["input_image"], namespace["image"]
    assert isinstance(image, Image.Image)
    assert image.size == (2 * source.width, 2 * source.height)  # the upscale block's 2x
    assert list(namespace["blocks"].sub_blocks) == [
        "text_encoder", "depth", "denoise", "decode", "filter", "upscale"
    ]
    assert Image.open(tmp_path / "depth-controlnet.png").size == image.size
