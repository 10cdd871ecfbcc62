"""`import blocks` must work where the serving stack is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_blocks_imports_without_ray_fastapi_prometheus():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        BLOCKED = ("ray", "fastapi", "prometheus_client", "starlette", "service", "deployments")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import blocks, blocks.demo, blocks.loading, blocks.families, blocks.hub_blocks
        pipe = blocks.demo.DemoAutoBlocks().init_pipeline()
        pipe.set_progress_bar_config(disable=True)
        assert pipe(prompt="red", output="images")[0].size == (32, 32)
        try:
            import fastapi  # noqa: F401
        except ModuleNotFoundError:
            print("isolated-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "isolated-ok" in result.stdout
