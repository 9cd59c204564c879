# freezeps image: one image for the PS and the workers (the command picks the role).
# Build where there is internet: docker build -t freezeps .
FROM python:3.11-slim-bookworm

# The default dataset ships as a Debian package; installed at build time, read offline.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 freezeps
WORKDIR /app
COPY pyproject.toml README.md requirements-nodeps.txt ./
COPY proto ./proto
COPY ps ./ps
COPY worker ./worker
COPY freezeps ./freezeps
COPY freeze ./freeze
# The CPU build of the pinned torch keeps the image small; the versions are the project's pins.
# For --device cuda, build with PyTorch's CUDA index instead, e.g.
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ, the index of your CUDA version
# (and run the containers with the GPUs passed in).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" \
        torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# Mount points owned by the service user: a named volume takes over their owner, so the
# unprivileged processes can write run logs, checkpoints and the generated certificates.
RUN install -d -o freezeps -g freezeps /runs /secrets
USER freezeps
VOLUME ["/runs", "/secrets"]
EXPOSE 50051
ENTRYPOINT ["freezeps"]
CMD ["--help"]
