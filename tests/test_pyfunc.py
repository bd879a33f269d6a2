"""The MLflow flavour: ``log_encoder`` -> registered pyfunc -> embeddings (in process and served).

Uses the throwaway MLflow store of ``conftest``. The served test starts a real
``mlflow models serve --env-manager local`` on 127.0.0.1 and sends a real request.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.models import Data2Vec2
from d2v.models.model_dir import save_model_dir

NAME = "d2v-test-encoder"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("pyf")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(d / "x.png")
    sf.write(d / "x.flac", (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
    return d


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_cfg):
    """A tiny image+speech+text model logged into a fresh run, registered, alias 'champion'."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from d2v.tracking.mlflow_utils import Tracker, tracking_uri
    from d2v.tracking.pyfunc import log_encoder

    torch.manual_seed(5)
    model = Data2Vec2(tiny_cfg("image", "speech", "text", text={"vocab_size": 260}))
    mdir = save_model_dir(model, tmp_path_factory.mktemp("reg") / "model", tokenizer="bytes", source="test")
    tr = Tracker("pyfunc-test", params={"x": 1})
    tr.finish()
    uri = log_encoder(mdir, tr.run_id, registered_model_name=NAME)
    client = MlflowClient(tracking_uri())
    version = uri.rsplit("/", 1)[1]
    client.set_registered_model_alias(NAME, "champion", version)
    run_uri = log_encoder(mdir, tr.run_id, artifact_path="encoder_unregistered")
    assert mlflow.get_tracking_uri() == tracking_uri()
    return {"dir": mdir, "uri": uri, "run_uri": run_uri, "run_id": tr.run_id, "model": model}


def _b64(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def test_log_encoder_uris(registered):
    assert registered["uri"] == f"models:/{NAME}/1"
    assert registered["run_uri"] == f"runs:/{registered['run_id']}/encoder_unregistered"


def test_pyfunc_predict_mixed_rows(registered, files):
    import mlflow.pyfunc
    import pandas as pd

    from d2v.inference import Encoder, encode

    pf = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    df = pd.DataFrame([{"text": "hello world", "key": "t"}, {"image": _b64(files / "x.png")},
                       {"audio": _b64(files / "x.flac")}, {"image_path": str(files / "x.png"), "key": "p"}])
    out = pf.predict(df)
    assert list(out.columns) == ["key", "modality", "num_tokens", "embedding"]
    assert out["key"].tolist() == ["t", "1", "2", "p"]
    assert out["modality"].tolist() == ["text", "image", "speech", "image"]
    emb = np.asarray(out["embedding"].tolist(), dtype=np.float32)
    assert emb.shape == (4, 32)
    np.testing.assert_allclose(emb[1], emb[3], rtol=1e-6)  # base64 bytes == the same file by path
    local = encode(Encoder.load(registered["dir"], device="cpu"), files / "x.png")
    np.testing.assert_allclose(emb[1], local.embeddings[0], rtol=1e-5, atol=1e-6)
    tok = pf.predict(df.iloc[[1]], params={"pooling": "tokens", "layer": 0})
    assert tok["num_tokens"].tolist() == [49] and np.asarray(tok["embedding"][0]).shape == (49, 32)


def test_pyfunc_bad_rows(registered, files):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    pf = mlflow.pyfunc.load_model(registered["run_uri"])
    for rows, msg in [
        ([{"text": "a", "image_path": str(files / "x.png")}], "fill exactly one of"),
        ([{"image": "not base64 !!"}], "not valid base64"),
        ([{"image_path": str(files / "nope.png")}], "no such file"),
        ([{"image": _b64(files / "x.flac"), "key": "k9"}], "k9.*cannot decode image"),
    ]:
        with pytest.raises(MlflowException, match=msg):
            pf.predict(pd.DataFrame(rows))


def test_encode_from_registered_model(registered, files, tmp_path, capsys):
    from d2v.cli.main import main
    from d2v.inference.encode import read_embeddings

    out = tmp_path / "e.parquet"
    assert main(["encode", f"models:/{NAME}@champion", str(files / "x.flac"), "--out", str(out), "--no-progress"]) == 0
    keys, emb, meta = read_embeddings(out)
    assert keys == ["x.flac"] and emb.shape == (1, 32) and meta["model"] == f"models:/{NAME}@champion"
    capsys.readouterr()
    assert main(["encode", "models:/no-such-model@champion", str(files / "x.flac"), "--out", str(out)]) == 2
    assert "models:/no-such-model@champion: cannot fetch the MLflow model" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_real_request(registered, files, tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "D2V_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail("server did not come up:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        body = {"dataframe_records": [{"text": "hello", "key": "t"}, {"image": _b64(files / "x.png"), "key": "i"},
                                      {"audio": _b64(files / "x.flac"), "key": "a"}],
                "params": {"pooling": "mean", "layer": -1}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert [p["key"] for p in preds] == ["t", "i", "a"]
        assert [p["modality"] for p in preds] == ["text", "image", "speech"]
        assert all(len(p["embedding"]) == 32 for p in preds)
        from d2v.inference import Encoder, encode

        local = encode(Encoder.load(registered["dir"], device="cpu"), files / "x.png").embeddings[0]
        np.testing.assert_allclose(np.asarray(preds[1]["embedding"], dtype=np.float32), local, rtol=1e-5, atol=1e-6)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": [{"image": "%%%"}]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(bad, timeout=60)
        assert ei.value.code == 400 and "not valid base64" in ei.value.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
