# blockserve on Ray's GPU image, for k8s/ (KubeRay): `docker build -t blockserve .`
# The Ray in the base image must match rayVersion in k8s/rayservice.yaml. torch is pinned and
# installed first, as the Makefile does, so the project's looser `torch>=` never pulls another
# build; the CUDA wheel comes from PyTorch's index (the base image has the CUDA runtime).
FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies before sources, so a code change reuses the dependency layer.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users blocks/ blocks/
COPY --chown=ray:users service/ service/
COPY --chown=ray:users deployments/ deployments/
COPY --chown=ray:users recipes/ recipes/
RUN pip install --no-cache-dir ".[ray]" "torch==${TORCH_VERSION}"
# The trained default model (18.7 MB): service/models.yaml names it as ../assets/tiny-shapes-sd,
# relative to itself, which is /app/assets here as in a checkout.
COPY --chown=ray:users assets/ assets/

ENV BLOCKSERVE_MODELS_FILE=/app/service/models.yaml \
    BLOCKSERVE_CACHE_DIR=/cache/blockserve \
    HF_HOME=/cache/huggingface
# KubeRay starts Ray itself (`ray start ...`) and deploys serveConfigV2, which imports
# service.ray_placement:build_app from this image; without KubeRay, run the API directly.
EXPOSE 8000 8080 8265
CMD ["blockserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
