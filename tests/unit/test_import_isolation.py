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


def test_deployments_import_blocks_and_ray_only():
    """`deployments` may import `blocks` and `ray`, never `service` or an HTTP stack; and
    `RemoteBlock`, the step scheduler, the block host and the app config need no ray."""
    import ast
    from pathlib import Path

    forbidden = {"service", "fastapi", "starlette", "uvicorn", "httpx", "prometheus_client"}
    for path in (Path(__file__).resolve().parents[2] / "deployments").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "fastapi", "service"):
                    raise ModuleNotFoundError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import deployments.remote_block, deployments.step_scheduler, deployments.app_config
        import deployments.block_host
        print("remote-block-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "remote-block-ok" in result.stdout


def test_embedded_mode_needs_no_ray():
    """One engine serves both modes: its embedded placement imports no Ray."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ModuleNotFoundError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import service.app, service.engine, service.placement, service.cli
        print("embedded-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "embedded-ok" in result.stdout
