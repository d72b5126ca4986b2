# CPU image of the project: PyTorch's CPU wheel, the package (editable), its config and launchers.
#   docker build -t pipeline .
#   docker run --rm pipeline                                   # 2-process pipeline in one container
#   docker compose up --build                                  # 2 containers as 2 nodes (docker-compose.yml)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The CPU build from PyTorch's own index (PyPI's default wheel is the multi-GB CUDA build).
# Its own layer, so editing the project does not download torch again.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The project: pyproject needs README.md (its long description) and the package to install; setup.py
# builds the C hot path of shared memory where the image has a compiler (slim has none: Python path).
COPY pyproject.toml setup.py README.md ./
COPY pipeline/ pipeline/
RUN pip install -e .

# Hydra's config lives beside the package (pipeline/config.py reads /app/conf); the launchers.
COPY conf/ conf/
COPY launch/ launch/

# Train as an unprivileged user. /runs is where docker-compose.yml mounts the shared volume: a new
# named volume takes this directory's owner, so the user can write runs there; /app/runs holds the
# default run directories of a plain `docker run`.
RUN useradd --create-home --uid 1000 trainer \
    && mkdir -p /runs /app/runs \
    && chown trainer /runs /app/runs
USER trainer

CMD ["bash", "launch/single_node.sh", "2"]
