"""Fork safety: a process forked after JAX started in its parent fails at once with a message
that says what to do (never hangs); one forked before JAX started may use JAX. The clients'
own idioms: a multiprocessing fork, and a webdataset WebLoader (torch DataLoader) with forked
workers after the parent used JAX."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.pipeline import forks
from vqgan_datasets.pipeline.engine import Engine

REPO = Path(__file__).resolve().parents[2]
CONFIG = VQGANConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
    z_channels=32, embed_dim=16, n_embed=64,
)
needs_fork = pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs os.fork")


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _run_loader(source: str, tmp_path, timeout: float) -> dict:
    """Run a WebLoader script in a fresh interpreter; what its RESULT line reports."""
    import json

    script = tmp_path / "loader.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(CONFIG.to_dict()), str(tmp_path / "s.tar")],
        env=_env(), capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT "):])


def _in_forked_child(engine: Engine, model: VQModel, queue) -> None:
    outcomes = []
    for name, call in (
        ("encode", lambda: engine.encode(np.zeros((1, 8, 8, 3), np.uint8))),
        ("encode_iter", lambda: list(engine.encode_iter([np.zeros((8, 8, 3), np.uint8)]))),
        ("decode", lambda: engine.decode(np.zeros((1, 16), np.int32))),
        ("Engine", lambda: Engine(model, batch_size=1)),
    ):
        try:
            call()
            outcomes.append((name, "returned"))
        except RuntimeError as e:
            outcomes.append((name, str(e)))
    queue.put(outcomes)


@needs_fork
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's own warning; the point here
def test_a_fork_after_jax_started_fails_at_once_with_what_to_do():
    model = VQModel(CONFIG, seed=0)
    engine = Engine(model, batch_size=1, workers=0)
    engine.encode(np.zeros((1, 8, 8, 3), np.uint8))  # JAX has run in this process
    assert forks.jax_started() and not forks.forked_after_jax()
    forks.check_fork_safety("here")  # the parent itself is fine

    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=_in_forked_child, args=(engine, model, queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung instead of failing")
    outcomes = dict(queue.get())
    assert child.exitcode == 0
    for name in ("encode", "encode_iter", "decode", "Engine"):
        message = outcomes[name]
        assert "forked after JAX had started in its parent" in message, (name, message)
        assert "main process" in message and "'spawn'" in message


def test_fork_bookkeeping_in_a_fresh_process():
    # A child forked before JAX started may use JAX; one forked after may not; a process that
    # was itself forked before JAX started and then started JAX stays free to use it.
    done = _run(
        """
        import os, sys
        from vqgan_datasets.pipeline import forks

        def child_can_run():
            pid = os.fork()
            if pid == 0:
                try:
                    forks.check_fork_safety("child")
                except RuntimeError:
                    os._exit(1)
                os._exit(0)
            return os.waitpid(pid, 0)[1] == 0

        import jax.numpy as jnp
        assert not forks.jax_started()  # imported, not started
        before = child_can_run()
        pid = os.fork()
        if pid == 0:  # forked before JAX started: starts JAX, then forks a child of its own
            jnp.zeros(2).block_until_ready()
            grandchild_ok = child_can_run()
            forks.check_fork_safety("middle")  # raises if the bookkeeping is wrong
            os._exit(0 if not grandchild_ok else 3)
        middle = os.waitpid(pid, 0)[1]
        jnp.ones(2).block_until_ready()
        after = child_can_run()
        print("RESULT", before, middle, after, forks.jax_started())
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT True 0 False True" in done.stdout


WEBLOADER_SCRIPT = """
import io, json, sys, tarfile, time
import numpy as np
import webdataset as wds
from PIL import Image
from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.pipeline.engine import Engine
from vqgan_datasets.models.modeling import VQModel

config = VQGANConfig(**json.loads(sys.argv[1]))
shard = sys.argv[2]
with tarfile.open(shard, "w") as tar:
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), i * 40, np.uint8)).save(buffer, "JPEG")
        member = tarfile.TarInfo(f"sample{i}.jpg")
        member.size = len(buffer.getvalue())
        tar.addfile(member, io.BytesIO(buffer.getvalue()))

model = VQModel(config, seed=0)
engine = Engine(model, batch_size=2, workers=0)
engine.encode(np.zeros((1, 8, 8, 3), np.uint8))  # the parent has used JAX


def encode(samples):
    samples = list(samples)
    tokens = engine.encode_iter([s["jpg"] for s in samples], image_size=8)
    for sample, result in zip(samples, tokens):
        yield {"__key__": sample["__key__"], "tokens": result.tokens}


dataset = wds.WebDataset(shard, shardshuffle=False).compose(encode).to_tuple("__key__", "tokens")
loader = wds.WebLoader(dataset, batch_size=None, num_workers=2)
start = time.monotonic()
try:
    for _ in loader:
        pass
    print("RESULT no error")
except RuntimeError as e:
    print("RESULT", json.dumps({"seconds": time.monotonic() - start, "message": str(e)}))
"""


@needs_fork
def test_webloader_with_forked_workers_after_the_parent_used_jax(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("webdataset")
    result = _run_loader(WEBLOADER_SCRIPT, tmp_path, timeout=180)
    assert result["seconds"] < 60  # failed at once, did not hang
    assert "forked after JAX had started in its parent" in result["message"]
    assert "main process" in result["message"] and "'spawn'" in result["message"]


LAZY_IDIOM_SCRIPT = """
import io, json, sys, tarfile, time
import numpy as np
import webdataset as wds
from PIL import Image
from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.modeling import VQModel  # the parent never imports the engine itself

config = VQGANConfig(**json.loads(sys.argv[1]))
shard = sys.argv[2]
with tarfile.open(shard, "w") as tar:
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), i * 40, np.uint8)).save(buffer, "JPEG")
        member = tarfile.TarInfo(f"sample{i}.jpg")
        member.size = len(buffer.getvalue())
        tar.addfile(member, io.BytesIO(buffer.getvalue()))
model = VQModel(config, seed=0)  # JAX has started in the parent


def encode(samples):
    from vqgan_datasets.pipeline.engine import get_engine  # first imported in the forked worker

    engine = get_engine(model, batch_size=2, workers=0)
    for sample in samples:
        (result,) = engine.encode_iter([sample["jpg"]], image_size=8)
        yield {"__key__": sample["__key__"], "tokens": result.tokens}


dataset = wds.WebDataset(shard, shardshuffle=False).compose(encode).to_tuple("__key__", "tokens")
start = time.monotonic()
try:
    for _ in wds.WebLoader(dataset, batch_size=None, num_workers=2, timeout=10):
        pass
    print("RESULT no error")
except RuntimeError as e:
    print("RESULT", json.dumps({"seconds": time.monotonic() - start, "message": str(e)}))
"""


@needs_fork
def test_webloader_idiom_when_the_parent_only_loaded_a_model(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("webdataset")
    result = _run_loader(LAZY_IDIOM_SCRIPT, tmp_path, timeout=240)
    assert result["seconds"] < 8, result  # failed at once (the loader gives up after 10 s)
    assert "forked after JAX had started in its parent" in result["message"]
