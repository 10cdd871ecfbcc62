"""blockserve's entry points: the `blockserve` command line and the HTTP image-generation API.

`service.app.create_app(settings)` builds the FastAPI app (embedded mode: models, engine and
metrics in this process); `service.cli` is the command line (`serve`, `generate`, `models`,
`tiny-model`, `train-shapes`, `eval-shapes`). `service` may import `deployments` and `blocks`;
nothing imports `service`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blockserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
