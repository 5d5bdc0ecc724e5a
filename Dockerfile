# ov2_megatron on NVIDIA's NGC PyTorch image, which brings CUDA, torch, Transformer Engine,
# Apex and DALI. We install only what the image lacks and never replace its torch.
#
#   docker build -t ov2-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it -v /data:/data ov2-megatron \
#       torchrun --nproc-per-node 8 -m ov2_megatron.train --recipe vit_l14
#
# For Slurm + pyxis, make a squashfs image and name it when submitting (launch/common.sh):
#   enroot import -o ov2-megatron.sqsh dockerd://ov2-megatron
#   OV2_CONTAINER_IMAGE=$PWD/ov2-megatron.sqsh sbatch launch/vit_1b.slurm
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /opt/ov2_megatron
COPY setup.py README.md pytest.ini ./
COPY ov2_megatron ./ov2_megatron
COPY kernels ./kernels
COPY tools ./tools
COPY launch ./launch
COPY tests ./tests

# Freeze the image's torch (and its DALI) so that no dependency resolution can swap them.
# megatron-core is the release `make test` proves on Python 3.12 (requirements-py312.txt).
RUN pip freeze | grep -iE '^(torch|nvidia-dali[a-z0-9-]*)==' > /tmp/image-constraints.txt \
 && pip install --no-cache-dir -c /tmp/image-constraints.txt \
        "megatron-core==0.19.2" "sentencepiece>=0.2" "tensorboard>=2.15" "psutil>=5.9" \
 && pip install --no-cache-dir --no-deps -e .

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
