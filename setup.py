"""ucofia-jax: UCoFiA (ICCV 2023) video-text retrieval in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.9",
    "ml_collections>=0.1.1",
    "einops>=0.7",
    "absl-py>=1.0",
    "transformers>=4.40",
    "safetensors>=0.4",
    "tensorflow-cpu>=2.15; platform_machine=='x86_64'",
    "tensorflow>=2.15; platform_machine!='x86_64'",
    "tensorboard>=2.15,<3",  # tf.summary writes the event files (training/metric_writer.py)
    "tensorflow-datasets>=4.9.4",
    "importlib_resources>=5.0",  # tfds imports it without declaring it
    "av>=12",
    "tqdm>=4.60",
    "ftfy>=6.0",
    "regex>=2022.1",
    "numpy>=1.24",
    "matplotlib>=3.6",
    "pillow>=9.0",
]

EXTRAS_REQUIRE = {
    # torch is only a test-time numerical reference. Pinned without a local label:
    # torch==2.13.0 takes a 2.13.0+cpu wheel where pip is offered one (see README
    # "Quick start") and the public build elsewhere; an unpinned torch pulls a
    # multi-GB CUDA build. ruff: tests/test_style.py; its formatting and rules
    # change between minor releases, hence the range. hypothesis: the reader fuzz tests;
    # selenium: the search page's browser test (it drives Debian's chromium).
    "test": [
        "pytest>=7",
        "pytest-xdist>=3",
        "torch==2.13.0",
        "ruff>=0.17,<0.18",
        "hypothesis>=6.100",
        "selenium>=4.20",
    ],
    # `python -m ucofia_jax.search`: the embedded vector store. The web page uses only the
    # standard library's http.server.
    "search": ["lancedb>=0.40,<0.41"],
    "openai": ["torch>=2.0"],  # only to import OpenAI ``.pt`` checkpoints
}

setup(
    name="ucofia-jax",
    version="0.1.0",
    description="UCoFiA: Unified Coarse-to-Fine Alignment for video-text retrieval, in JAX/Flax",
    packages=find_packages(
        include=["ucofia_jax", "ucofia_jax.*", "data_pipeline", "data_pipeline.*", "configs"]
    ),
    # kernels/*.cc: the native CPU kernel is compiled from source on first use;
    # search/static: the search page
    package_data={
        "ucofia_jax": ["assets/*.gz", "assets/LICENSE-*", "kernels/*.cc", "search/static/*"]
    },
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
