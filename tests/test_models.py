import urllib.error

import pytest
import torch

from int8eval.errors import ModelLoadError
from int8eval.models import list_models, load_model


def test_tiny_model_and_its_preprocessing():
    m = load_model("tiny_test")
    assert m.input_shape == (3, 32, 32)
    assert m.module(m.example_input(2)).shape == (2, 1000)


def test_efficientnet_lite0_rewrite_keeps_the_logits_and_the_tf_preprocessing():
    from int8eval.models.efficientnet_lite import reference_model

    m = load_model("efficientnet_lite0")
    p = m.preprocessing
    assert (p.resize, p.crop, p.interpolation.value) == (256, 224, "bicubic")
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)  # not ImageNet's mean/std: that costs ~10 points
    x = m.example_input(2)
    with torch.no_grad():
        torch.testing.assert_close(m.module(x), reference_model("efficientnet_lite0")(x), rtol=1e-5, atol=1e-5)
    # BatchNorm can fold: every convolution is a plain nn.Conv2d, and no activation module is shared.
    assert not any("SamePadding" in type(mod).__name__ for mod in m.module.modules())
    relus = [mod for mod in m.module.modules() if isinstance(mod, torch.nn.ReLU6)]
    assert len(relus) == len({id(r) for r in relus}) > 30


def test_checkpoint_loads_with_weights_only_and_mismatch_is_explained(tmp_path):
    m = load_model("tiny_test")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in m.module.state_dict().items()}
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": state}, path)
    loaded = load_model("tiny_test", checkpoint=path)
    torch.testing.assert_close(loaded.module.fc.bias, state["fc.bias"])
    assert loaded.source == str(path)

    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="does not match the architecture"):
        load_model("tiny_test", checkpoint=tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("tiny_test", checkpoint=tmp_path / "missing.pt")


def test_broken_checkpoints_are_one_line_messages(tmp_path):
    state = load_model("tiny_test").module.state_dict()
    cases = {}
    torch.save({**state, "fc.weight": torch.zeros(10, 32), "fc.bias": torch.zeros(10)}, tmp_path / "shapes.pt")
    cases["shapes.pt"] = r"fc.weight is \[10, 32\] in the checkpoint and \[1000, 32\] in the model"  # the first
    torch.save({**state, "fc.bias": [0.0] * 1000}, tmp_path / "list.pt")
    cases["list.pt"] = "fc.bias holds a list, not a tensor"
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty.pt"] = r"cannot read checkpoint .*empty.pt \(EOFError: the file is empty\)"
    torch.save(state, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:3000])
    cases["cut.pt"] = r"cannot read checkpoint .*cut.pt \(RuntimeError: PytorchStreamReader failed reading zip archive"
    (tmp_path / "folder.pt").mkdir()
    cases["folder.pt"] = "folder.pt is not a regular file"
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"fc.bias": Payload()}, tmp_path / "pickle.pt")
    cases["pickle.pt"] = r"refused by the weights-only loader, which runs no code .*GLOBAL .*system"
    torch.save([1, 2], tmp_path / "seq.pt")
    cases["seq.pt"] = "holds a list, not a state_dict"
    for name, message in cases.items():
        with pytest.raises(ModelLoadError, match=message) as e:
            load_model("tiny_test", checkpoint=tmp_path / name)
        assert "\n" not in str(e.value), name


def test_unknown_model_suggests_names():
    with pytest.raises(ModelLoadError, match="Did you mean resnet50"):
        load_model("resnet5")


def test_torchvision_offline_says_where_to_put_the_file(monkeypatch, tmp_path):
    import torchvision

    from int8eval.models import weights

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(weights, "reachable", lambda url: True)  # the host answers, the download then fails
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelLoadError, match=r"checkpoints/resnet18-.*\.pth.*--weights-file"):
        load_model("resnet18")


def test_torchvision_preprocessing_comes_from_the_weights(tmp_path):
    import torchvision

    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    m = load_model("resnet18", checkpoint=path, weights="IMAGENET1K_V1")
    p = m.preprocessing
    assert (p.resize, p.crop, p.interpolation.value, p.mean) == (256, 224, "bilinear", (0.485, 0.456, 0.406))
    with pytest.raises(ModelLoadError, match="IMAGENET1K_V1"):
        load_model("resnet18", checkpoint=path, weights="V9")


def test_timm_model_with_a_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "t.pt"
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), path)
    m = load_model("timm:tf_efficientnet_lite0", checkpoint=path)
    assert m.preprocessing.crop == 224 and m.preprocessing.mean == (0.5, 0.5, 0.5)


def test_models_listing():
    names = {m.name for m in list_models()}
    assert {"efficientnet_lite0", "resnet50", "tiny_test", "timm:NAME"} <= names
