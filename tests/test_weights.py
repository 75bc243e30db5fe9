"""Weights without the internet: --weights-file, the torch hub and Hugging Face caches, and the offline fast-fail."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest
import torch
from click.testing import CliRunner

from int8eval.cli import main
from int8eval.errors import ConfigError, ModelLoadError
from int8eval.models import hub, load_model, weights

R18_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file name


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty torch hub and Hugging Face caches, every connection refused, and any download attempt a failure."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    def refused(*a, **k):
        raise OSError("Network is unreachable")

    def no_download(*a, **k):
        raise AssertionError("a download was attempted although the host did not answer")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights.socket, "create_connection", refused)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    probe = weights.reachable  # a test may replace it
    probe.cache_clear()
    yield tmp_path
    probe.cache_clear()


def test_torchvision_offline_fails_fast_naming_model_cache_and_fix(no_network):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("resnet18")
    assert time.perf_counter() - start < 5
    message = str(e.value)
    assert "resnet18" in message and str(no_network / "torch" / "hub" / "checkpoints" / R18_FILE) in message
    assert "TORCH_HOME" in message and "--weights-file" in message and "does not answer" in message


def test_timm_offline_fails_fast_naming_both_caches(no_network):
    pytest.importorskip("timm")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("timm:resnet18")
    assert time.perf_counter() - start < 5
    message = str(e.value)
    assert "timm:resnet18" in message and str(no_network / "hf") in message and "HF_HOME" in message
    assert "model.safetensors" in message and "--weights-file" in message


def test_hf_hub_offline_is_honoured_without_a_probe(no_network, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "reachable", lambda url: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load_model("timm:test_vit")


def test_weights_in_the_torch_hub_cache_load_offline_with_their_published_accuracy(no_network):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    state["fc.bias"] += 3.0
    target = no_network / "torch" / "hub" / "checkpoints" / R18_FILE
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    m = load_model("resnet18")
    torch.testing.assert_close(m.module.fc.bias, state["fc.bias"])
    assert str(target) in m.source and m.published_top1 == pytest.approx(69.758)


def test_timm_weights_in_the_hugging_face_cache_load_offline(no_network):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    state = timm.create_model("test_vit").state_dict()
    state["head.bias"] = state["head.bias"] + 2.0
    repo = no_network / "hf" / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    m = load_model("timm:test_vit")
    torch.testing.assert_close(m.module.head.bias, state["head.bias"])
    assert "model.safetensors" in m.source


def test_the_probe_answers_within_its_timeout():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert weights.reachable.__wrapped__(f"http://127.0.0.1:{port}/x")
    finally:
        server.close()
    assert not weights.reachable.__wrapped__(f"http://127.0.0.1:{port}/x")  # closed: refused at once


def test_a_hung_resolver_does_not_hang_the_probe(monkeypatch):
    release = threading.Event()

    def hung(*a, **k):  # as getaddrinfo can be: no timeout of its own
        release.wait(30)
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(weights.socket, "create_connection", hung)
    start = time.perf_counter()
    assert not weights.reachable.__wrapped__("https://example.invalid/x", 0.2)
    assert time.perf_counter() - start < 2
    release.set()


def _run(args):
    return CliRunner().invoke(main, args)


def test_weights_file_round_trip_through_run(image_folder, tmp_path):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    out = tmp_path / "run"
    result = _run(["run", "-m", "resnet18", "--weights-file", str(path), "--data", str(image_folder), "--out",
                   str(out), "--fp32-only", "--batch-size", "6"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert str(path) in report["model"]["source"] and report["variants"][0]["status"] == "ok"
    assert report["preprocessing_check"] is None  # a file of its own: torchvision's published top-1 does not apply

    del state["fc.weight"]
    state["classifier.weight"] = torch.zeros(1)
    torch.save(state, path)
    result = _run(["run", "-m", "resnet18", "--weights-file", str(path), "--data", str(image_folder), "--out",
                   str(tmp_path / "bad"), "--fp32-only"])
    assert result.exit_code == 1
    assert "does not match the architecture" in result.output
    assert "fc.weight" in result.output and "classifier.weight" in result.output  # the missing and unexpected keys


def test_a_weights_file_is_published_only_when_its_sha256_matches_the_url(tmp_path):
    import hashlib

    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    assert hub.is_published_file(path, f"https://example.org/m-{prefix}.pth")
    assert not hub.is_published_file(path, "https://example.org/m-00000000.pth")
    assert not hub.is_published_file(path, "https://example.org/m.pth")


def test_random_weights_are_said_so_and_exclude_a_weights_file(tmp_path):
    pytest.importorskip("timm")
    m = load_model("timm:test_vit", weights="random")
    assert "random" in m.source and m.published_top1 is None
    torch.save({}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="--weights random"):
        load_model("timm:test_vit", weights="random", checkpoint=tmp_path / "x.pt")


def test_a_sweep_names_the_weights_file_as_run_does():
    from int8eval.commands.sweep import SweepModel

    assert SweepModel.model_validate({"name": "resnet18", "weights_file": "r18.pt"}).checkpoint.name == "r18.pt"
    assert SweepModel.model_validate({"name": "resnet18", "checkpoint": "r18.pt"}).checkpoint.name == "r18.pt"


def test_a_safetensors_weights_file_loads(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    state = timm.create_model("test_vit").state_dict()
    state["head.bias"] = state["head.bias"] + 1.0
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    m = load_model("timm:test_vit", checkpoint=tmp_path / "model.safetensors")
    torch.testing.assert_close(m.module.head.bias, state["head.bias"])
