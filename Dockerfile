# retro_toolkit on a CUDA PyTorch base image (Python 3.11).
#   docker build -t retro-toolkit .
#   docker run --gpus all -v $PWD/runs:/workspace/runs retro-toolkit retro-run smoke
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/retro_toolkit
COPY pyproject.toml setup.py README.md ./
COPY retro_toolkit ./retro_toolkit
COPY recipes ./recipes
COPY yaml ./yaml
# The base image's torch satisfies the torch requirement; [demo] adds the bundled
# demo corpora and the small offline embedder.
RUN pip install '.[demo]'

WORKDIR /workspace
ENTRYPOINT []
CMD ["retro-run", "--help"]
