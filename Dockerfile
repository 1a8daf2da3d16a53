# Fable on a Hugging Face Space (Docker SDK): gunicorn serving the bundled checkpoints on
# port 7860, as uid 1000. Build: docker build -t fable . ; run: docker run -p 7860:7860 fable
# tests/apis/test_app_server.py runs this file's CMD with its ENV (no Docker engine needed).

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler: Fable's decoding kernels (models_src/row_products.c) are built on first use
# for the CPU the Space runs on, which is not the one that built the image; without one,
# decoding keeps torch's products, about half as fast (benchmarks/README.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000: build and run as that user.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH
# Every cache in a folder the user can write (the defaults under / are not).
ENV HF_HOME=$HOME/.cache/huggingface \
    XDG_CACHE_HOME=$HOME/.cache \
    MPLCONFIGDIR=$HOME/.cache/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=$HOME/.cache/torchinductor
# Serving settings (see app/platform/settings.py and gunicorn.conf.py); a Space's variables override them.
# Two workers for the free CPU Space's two vCPUs: each decodes its own batch on one torch
# thread, so neither waits for the other's GIL; at 16 clients ~1.3x and at 64 ~1.7x the
# tokens/s of one worker, a lone request as fast, twice the models' memory
# (benchmarks/README.md, "Serving").
# FABLE_HOST: every address, as the Space's router reaches the container from outside
# (gunicorn.conf.py's default is 127.0.0.1, this machine only).
ENV PORT=7860 \
    FABLE_HOST=0.0.0.0 \
    FABLE_CHECKPOINT_DIR=$HOME/app/checkpoints \
    FABLE_WORKERS=2

WORKDIR $HOME/app

# CPU-only torch first, from PyTorch's CPU index, so requirements.txt's torch pin is
# already satisfied and pip never pulls the multi-GB CUDA build. TORCH_INDEX is a build
# argument so that the image test (make docker-test) can give a local index of this
# machine's wheel; torch's own dependencies then come with requirements.txt from PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --chown=user requirements.txt .
RUN pip install --user --no-deps torch==2.13.0 --index-url "$TORCH_INDEX" \
 && pip install --user -r requirements.txt

COPY --chown=user . .
# htmx and its SSE extension, pinned and checksummed by package-lock.json
RUN python scripts/vendor_assets.py

EXPOSE 7860
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
