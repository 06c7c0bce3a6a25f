# retro_toolkit for GPU clusters: CUDA PyTorch, faiss-gpu, the package and its recipes.
#   docker build -t retro-toolkit .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs retro-toolkit retro-run smoke
# On Slurm with Pyxis/enroot, push the image and set executor.container_image (see
# yaml/executor/slurm_cluster.yaml); with executor=docker, NeMo-Run starts it per stage.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

ENV HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/retro_toolkit
COPY pyproject.toml setup.py README.md ./
COPY retro_toolkit ./retro_toolkit
COPY recipes ./recipes
COPY yaml ./yaml
# The base image's CUDA torch satisfies the torch requirement. faiss-gpu replaces the
# faiss-cpu wheel (same `import faiss`): index training and, where the index type has a
# GPU version, neighbour search run on the GPUs. [demo] adds the bundled demo corpora.
RUN pip install '.[demo]' \
 && pip uninstall -y faiss-cpu \
 && pip install 'faiss-gpu-cu12>=1.8' \
 && python -c "import faiss, retro_toolkit; print('faiss', faiss.__version__, 'GPUs visible at build:', faiss.get_num_gpus())"
# Transformer Engine (fused attention) is optional; retro_toolkit uses PyTorch's SDPA
# (flash attention on GPUs) either way. Uncomment to add it:
# RUN pip install --no-build-isolation 'transformer_engine[pytorch]'

WORKDIR /workspace
ENTRYPOINT []
CMD ["retro-run", "--help"]
