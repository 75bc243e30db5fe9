import os
import tarfile

import numpy as np
import pytest
from conftest import WNIDS, write_image

from int8eval.config import OnBadImage, Preprocessing
from int8eval.data import discover, synsets, wnid_to_index
from int8eval.data.decode import batches
from int8eval.data.fetch import default_data_root, fetch_sample, prepare
from int8eval.data.layouts import split, subsample
from int8eval.errors import DatasetError
from int8eval.evaluate import evaluate

PRE = Preprocessing(resize=40, crop=32)


def test_label_space_is_the_canonical_sorted_1000():
    wnids, names = synsets()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and names[0] == "tench"
    assert wnid_to_index()["n15075141"] == 999


def test_subset_of_folders_maps_to_canonical_indices_not_folder_order(image_folder):
    found = discover(image_folder)
    assert found.layout == "folder-per-synset"
    labels = {s.id.split("/")[0]: s.label for s in found.samples}
    assert labels == {"n01443537": 1, "n04590129": 905, "n15075141": 999}
    assert len(found) == 12


def test_shared_sample_labels_follow_the_1000_synset_list(shared_sample):
    found = discover(shared_sample)
    assert len(found) == 800 and not found.skipped
    index = wnid_to_index()
    assert all(s.label == index[s.id.split("/")[0]] for s in found.samples)
    # 800 of 1000 classes: labels span the whole range, so folder position (0..799) would differ
    assert len({s.label for s in found.samples}) == 800 and max(s.label for s in found.samples) > 799
    assert sum(s.label != i for i, s in enumerate(found.samples)) > 600


def _bad_folder(root):
    wnid = WNIDS[0]
    write_image(root / wnid / "good.JPEG", seed=1)
    write_image(root / wnid / "gray.JPEG", seed=2, mode="L")
    write_image(root / wnid / "cmyk.JPEG", seed=3, mode="CMYK")
    write_image(root / wnid / "png_named.JPEG", seed=4, fmt="PNG")
    (root / wnid / "corrupt.JPEG").write_bytes(b"this is not an image at all")
    good = (root / wnid / "good.JPEG").read_bytes()
    (root / wnid / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    os.symlink(root / "nowhere.JPEG", root / wnid / "unreadable.JPEG")
    (root / wnid / "notes.txt").write_text("not an image")
    (root / WNIDS[1]).mkdir()  # empty folder
    write_image(root / "cats" / "cat.JPEG", seed=5)  # not a synset
    write_image(root / "n99999999" / "x.JPEG", seed=6)  # synset-shaped, not in ImageNet-1k
    return root


def test_bad_inputs_are_converted_or_skipped_with_a_reason(tmp_path):
    root = _bad_folder(tmp_path / "bad")
    found = discover(root)
    reasons = {s["path"]: s["reason"] for s in found.skipped}
    assert reasons["cats/"] == "folder name is not a WordNet id"
    assert reasons["n99999999/"] == "not an ImageNet-1k synset"
    assert reasons[f"{WNIDS[1]}/"] == "empty folder"
    assert reasons[f"{WNIDS[0]}/notes.txt"] == "not an image file"
    assert reasons[f"{WNIDS[0]}/unreadable.JPEG"].startswith("broken symlink")  # found before anything opens it

    class Identity:
        name = "id"

        def predict(self, x):
            return np.zeros((len(x), 1000), np.float32)

    outcome = evaluate(found.samples, PRE, [Identity()], batch_size=3, workers=0)
    read = set(outcome.predictions.image_ids)
    assert read == {f"{WNIDS[0]}/{n}.JPEG" for n in ("good", "gray", "cmyk", "png_named")}
    bad = {s["path"].split("/")[-1]: s["reason"] for s in outcome.skipped}
    assert set(bad) == {"corrupt.JPEG", "truncated.JPEG"}
    assert "truncated" in bad["truncated.JPEG"]
    assert "UnidentifiedImageError" in bad["corrupt.JPEG"]

    with pytest.raises(DatasetError, match="corrupt.JPEG"):
        evaluate(found.samples, PRE, [Identity()], batch_size=3, workers=0, on_bad_image=OnBadImage.fail)


def test_grayscale_and_cmyk_decode_to_three_channels(tmp_path):
    root = tmp_path / "d"
    write_image(root / WNIDS[0] / "g.JPEG", mode="L")
    write_image(root / WNIDS[0] / "c.JPEG", mode="CMYK")
    (batch,) = list(batches(discover(root).samples, PRE, batch_size=8, workers=0))
    assert batch.images.shape == (2, 3, 32, 32) and batch.images.dtype == np.float32


def test_preprocessing_is_resize_crop_normalise(tmp_path):
    root = tmp_path / "d"
    from PIL import Image

    root.joinpath(WNIDS[0]).mkdir(parents=True)
    Image.new("RGB", (80, 60), (255, 0, 128)).save(root / WNIDS[0] / "flat.JPEG", quality=100)
    pre = Preprocessing(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    (batch,) = list(batches(discover(root).samples, pre, batch_size=1, workers=0))
    assert batch.images.shape == (1, 3, 32, 32)
    # (x - 0.5) / 0.5 maps 255 -> 1, 0 -> -1, 128 -> ~0
    np.testing.assert_allclose(batch.images[0, :, 16, 16], [1.0, -1.0, 0.0], atol=0.03)


def test_only_unreadable_images_fails_clearly(tmp_path):
    root = tmp_path / "d"
    (root / WNIDS[0]).mkdir(parents=True)
    (root / WNIDS[0] / "a.JPEG").write_bytes(b"junk")

    class V:
        name = "v"

        def predict(self, x):
            return np.zeros((len(x), 1000), np.float32)

    with pytest.raises(DatasetError, match="none of the 1 images could be read"):
        evaluate(discover(root).samples, PRE, [V()], workers=0)


def test_empty_or_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no labelled images"):
        discover(tmp_path / "empty")


def test_flat_folder_without_labels_says_what_to_pass(tmp_path):
    write_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetError, match="--labels"):
        discover(tmp_path / "val")


def _flat_val(tmp_path, n=4):
    val = tmp_path / "val"
    for i in range(1, n + 1):
        write_image(val / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    return val


def test_flat_val_with_loc_solution_csv(tmp_path):
    val = _flat_val(tmp_path)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n15075141 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8\n"
        "ILSVRC2012_val_00000003,n04590129 1 2 3 4\n"
    )
    found = discover(val, labels=csv)
    assert [s.label for s in found.samples] == [999, 1, 905]
    assert found.skipped == [{"path": "ILSVRC2012_val_00000004.JPEG", "reason": "no ground truth in LOC_val_solution.csv"}]


def _devkit(tmp_path):
    """A miniature devkit: meta.mat whose ILSVRC2012_IDs are NOT sorted-wnid order, plus the ground-truth txt."""
    from scipy.io import savemat

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    rows = [(1, "n15075141", "toilet tissue", "", 0), (2, "n01443537", "goldfish", "", 0), (3, "n00001740", "entity", "", 2)]
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": np.array(rows, dtype=dtype)})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n2\n1\n")
    return data.parent


def test_flat_val_with_devkit_ground_truth_uses_meta_mat(tmp_path):
    val, devkit = _flat_val(tmp_path), _devkit(tmp_path)
    for labels in (devkit, devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"):
        found = discover(val, labels=labels)
        assert [s.label for s in found.samples] == [1, 999, 1, 999]
    tar_path = tmp_path / "devkit.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(devkit, arcname="ILSVRC2012_devkit_t12")
    assert [s.label for s in discover(val, labels=tar_path).samples] == [1, 999, 1, 999]


def test_ground_truth_txt_without_meta_mat_is_explained(tmp_path):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n")
    with pytest.raises(DatasetError, match="meta.mat"):
        discover(_flat_val(tmp_path), labels=gt)


def test_prepare_sorts_flat_folder_and_tar_into_synsets(tmp_path):
    val, devkit = _flat_val(tmp_path), _devkit(tmp_path)
    assert prepare(val, devkit, tmp_path / "sorted") == 4
    found = discover(tmp_path / "sorted")
    assert sorted(s.id for s in found.samples)[0] == "n01443537/ILSVRC2012_val_00000001.JPEG"
    tar_path = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(tar_path, "w") as tar:
        for p in sorted(val.iterdir()):
            tar.add(p, arcname=p.name)
    assert prepare(tar_path, devkit, tmp_path / "from_tar") == 4
    assert len(discover(tmp_path / "from_tar")) == 4


def test_wnid_prefixed_flat_files(tmp_path):
    write_image(tmp_path / "s" / "n01443537_goldfish.JPEG")
    write_image(tmp_path / "s" / "n15075141_toilet_tissue.JPEG")
    assert [s.label for s in discover(tmp_path / "s").samples] == [1, 999]


def test_calibration_split_is_seeded_and_disjoint(image_folder):
    samples = discover(image_folder).samples
    calib, rest = split(samples, 5, seed=3)
    assert len(calib) == 5 and len(rest) == 7 and not {s.id for s in calib} & {s.id for s in rest}
    assert split(samples, 5, seed=3) == (calib, rest)
    assert split(samples, 5, seed=4)[0] != calib
    with pytest.raises(DatasetError, match="--calib-size 12"):
        split(samples, 12, seed=0)
    assert len(subsample(samples, 4, seed=0)) == 4 and subsample(samples, None, 0) == samples


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("INT8EVAL_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("INT8EVAL_DATA")
    monkeypatch.setenv("INT8EVAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match="fetch-sample"):
        default_data_root()


def test_fetch_sample_offline_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="--data DIR"):
        fetch_sample(tmp_path, url="http://127.0.0.1:9/none.zip")
