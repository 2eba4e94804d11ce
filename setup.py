"""kimi_vl_jax: Kimi-VL (vision-language MoE) training in JAX/Flax."""

import setuptools

setuptools.setup(
    name='kimi_vl_jax',
    version='0.1.0',
    description='A JAX/Flax reimplementation of the Kimi-VL training stack, for TPU pods.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['kimi_vl_jax', 'kimi_vl_jax.*']),
    package_data={'kimi_vl_jax': ['data/assets/*']},
    python_requires='>=3.12',
    install_requires=[
        'jax>=0.12,<0.13',
        'flax>=0.12',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'grain>=0.2.18',
        'array-record',
        'sentencepiece',
        'ml_collections',
        'chex',
        'safetensors',
        'tiktoken',
        'pillow',
        'absl-py',
        'tensorboardX',
        'tqdm',
        'numpy',
        'matplotlib',
        'easy-vqa',
        'fsspec',
        's3fs',
        'gcsfs',
    ],
    extras_require={
        # libtpu lets the test suite compile for TPU topologies ahead of time (tests/parallel/test_aot.py);
        # nbclient, nbformat and ipykernel run launch/colab_tiny.ipynb headless (tests/launch).
        # moto[server] and gcp-storage-emulator are S3 / GCS servers on localhost (tests/storage).
        'test': ['pytest', 'pytest-xdist', 'libtpu', 'nbclient', 'nbformat', 'ipykernel',
                 'moto[server]', 'gcp-storage-emulator'],
        'tpu': ['jax[tpu]>=0.12,<0.13'],
    },
)
