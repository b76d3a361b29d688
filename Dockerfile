# The emflow image for `--cluster kubernetes`: the Dask scheduler and workers run it (the
# scheduler preloads emflow.dask_preload, workers import emflow to run units), and so can a
# driver pod (`emflow run recipe.yaml --cluster kubernetes` inside the cluster).
#
# Build and push (README, "Kubernetes"), then name the image in your cluster config:
#   docker build -t registry.example.org/lab/emflow:0.1.0 .
#   docker push registry.example.org/lab/emflow:0.1.0
#   # cluster_configs/kubernetes.yaml (or your --cluster-config):  image: registry.example.org/lab/emflow:0.1.0
#
# The spec runs the container's args (`dask scheduler ...`, `dask worker ...`) with no
# entrypoint, so `dask` and `emflow` must be on PATH; nothing here holds credentials (pods
# get them from a Kubernetes Secret: pod.envFrom in the cluster config).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /opt/emflow
COPY pyproject.toml README.md ./
COPY emflow ./emflow
RUN pip install ".[kubernetes]" \
    && python -c "import emflow.dask_preload, emflow.render, tensorstore, cv2" \
    && useradd --create-home --uid 1000 emflow

USER 1000
WORKDIR /home/emflow
CMD ["emflow", "--help"]
