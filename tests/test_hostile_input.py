"""Hostile and broken input (issue 12, input side): labels files, tars, image files and folders, checkpoints and flag
combinations that must never write outside --out, hang, give a silently wrong number, or end in a traceback."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import WNIDS, write_image
from PIL import Image

from int8eval.cli import main
from int8eval.config import Backend, OnBadImage, Preprocessing, Recipe, RunConfig
from int8eval.data import decode, discover
from int8eval.data.fetch import prepare
from int8eval.errors import DatasetError, ModelLoadError
from int8eval.evaluate import evaluate

PRE = Preprocessing(resize=40, crop=32)


@pytest.fixture
def no_hang():
    """Fail instead of hanging: a blocked open() or read() is interrupted after 30 s."""

    def stop(*_):
        raise TimeoutError("blocked for 30 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("ImageId,PredictionString\n" + "".join(f"{i},{p}\n" for i, p in rows))
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def _files_outside(tmp_path: Path, out: Path, known: set[Path]) -> list[str]:
    return sorted(str(p) for p in tmp_path.rglob("*") if not p.is_dir() and out not in p.parents and p not in known)


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# --- security: data prepare -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_id, klass",
    [(".bashrc", "{victim}"), ("ILSVRC2012_val_00000001", "../../escaped"), ("ILSVRC2012_val_00000001", "/abs/dir"),
     ("../../ILSVRC2012_val_00000001", WNIDS[0]), ("ILSVRC2012_val_00000001", "n99999999")],
)
def test_prepare_refuses_labels_that_name_paths(tmp_path, image_id, klass):
    victim = tmp_path / "victim"
    victim.mkdir()
    labels = _csv(tmp_path / "LOC_val_solution.csv", [(image_id, klass.format(victim=victim) + " 1 2 3 4")])
    tar = _tar(tmp_path / "val.tar", [(".bashrc", b"echo pwned\n"), ("ILSVRC2012_val_00000001.JPEG", _jpeg_bytes())])
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(DatasetError, match=r"LOC_val_solution.csv line 2: .*(not a WordNet id|not an ImageNet-1k synset|not a file name)"):
        prepare(tar, labels, out)
    assert _files_outside(tmp_path, out, {labels, tar}) == [] and not any(out.rglob("*"))


def test_prepare_from_tar_writes_only_image_files_under_out(tmp_path):
    victim = tmp_path / "victim.JPEG"
    victim.write_bytes(b"user data")
    labels = _csv(tmp_path / "LOC_val_solution.csv", [(f"ILSVRC2012_val_{i:08d}", f"{WNIDS[i % 3]} 1 2 3 4") for i in range(1, 7)])
    link = tarfile.TarInfo("ILSVRC2012_val_00000003.JPEG")
    link.type, link.linkname = tarfile.SYMTYPE, str(victim)
    hard = tarfile.TarInfo("ILSVRC2012_val_00000004.JPEG")
    hard.type, hard.linkname = tarfile.LNKTYPE, "ILSVRC2012_val_00000001.JPEG"
    fifo = tarfile.TarInfo("ILSVRC2012_val_00000005.JPEG")
    fifo.type = tarfile.FIFOTYPE
    device = tarfile.TarInfo("ILSVRC2012_val_00000006.JPEG")
    device.type = tarfile.CHRTYPE
    tar = _tar(tmp_path / "val.tar", [
        ("../../ILSVRC2012_val_00000001.JPEG", _jpeg_bytes(1)),  # folders in member names never reach the path
        (f"{tmp_path}/abs/ILSVRC2012_val_00000002.JPEG", _jpeg_bytes(2)),
        link, hard, fifo, device,
        ("ILSVRC2012_val_00000002.txt", b"not an image"),
    ])
    out = tmp_path / "out"
    assert prepare(tar, labels, out) == 2
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    assert written == [f"{WNIDS[1]}/ILSVRC2012_val_00000001.JPEG", f"{WNIDS[2]}/ILSVRC2012_val_00000002.JPEG"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert _files_outside(tmp_path, out, {labels, tar, victim}) == [] and victim.read_bytes() == b"user data"
    assert prepare(tar, labels, out) == 2  # a re-run replaces its own files


def test_tar_prepare_never_writes_through_the_links_of_a_folder_prepare(tmp_path):
    val = tmp_path / "val"
    for i in (1, 2):
        write_image(val / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    originals = {p: p.read_bytes() for p in val.iterdir()}
    labels = _csv(tmp_path / "LOC_val_solution.csv", [("ILSVRC2012_val_00000001", f"{WNIDS[0]} 1"), ("ILSVRC2012_val_00000002", f"{WNIDS[1]} 1")])
    out = tmp_path / "out"
    assert prepare(val, labels, out) == 2 and prepare(val, labels, out) == 2  # links, re-run
    assert (out / WNIDS[0] / "ILSVRC2012_val_00000001.JPEG").is_symlink()
    tar = _tar(tmp_path / "val.tar", [("ILSVRC2012_val_00000001.JPEG", b"OVERWRITTEN")])
    with pytest.raises(DatasetError, match=r"ILSVRC2012_val_00000001.JPEG is a symlink to .*val/ILSVRC2012_val_00000001.JPEG"):
        prepare(tar, labels, out)
    with pytest.raises(DatasetError, match="is a symlink"):
        prepare(val, labels, out, copy=True)
    assert {p: p.read_bytes() for p in val.iterdir()} == originals

    # A class folder that is a link to elsewhere is in the way too.
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "out2").mkdir()
    os.symlink(other, tmp_path / "out2" / WNIDS[0])
    with pytest.raises(DatasetError, match=f"{WNIDS[0]} is a symlink to"):
        prepare(tar, labels, tmp_path / "out2")
    assert not any(other.iterdir())
    # Copies where the links were asked for: a file is in the way of a link.
    assert prepare(val, labels, tmp_path / "copies", copy=True) == 2
    with pytest.raises(DatasetError, match="is a file"):
        prepare(val, labels, tmp_path / "copies")


def test_prepare_leaves_a_source_already_in_place_and_refuses_a_file_as_out(tmp_path):
    out = tmp_path / "out"
    source = write_image(out / WNIDS[0] / "ILSVRC2012_val_00000001.JPEG")
    original = source.read_bytes()
    labels = _csv(tmp_path / "LOC_val_solution.csv", [("ILSVRC2012_val_00000001.JPEG", f"{WNIDS[0]} 1")])
    assert prepare(source.parent, labels, out) == 1  # before: the image deleted, a link to itself left
    assert not source.is_symlink() and source.read_bytes() == original
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="--out .*file is a file"):
        prepare(source.parent, labels, tmp_path / "file")


def test_a_fifo_as_labels_file_is_refused(tmp_path, no_hang):
    os.mkfifo(tmp_path / "LOC_val_solution.csv")
    with pytest.raises(DatasetError, match="LOC_val_solution.csv is not a regular file"):
        discover(_flat(tmp_path), tmp_path / "LOC_val_solution.csv")


@pytest.mark.parametrize("content", [b"", b"this is not a tar" * 100, "truncated"])
def test_broken_tar_is_a_message(tmp_path, content):
    labels = _csv(tmp_path / "LOC_val_solution.csv", [("ILSVRC2012_val_00000001", f"{WNIDS[0]} 1")])
    path = tmp_path / "val.tar"
    if content == "truncated":
        _tar(path, [("ILSVRC2012_val_00000001.JPEG", _jpeg_bytes())])
        content = path.read_bytes()[:700]
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=r"cannot read .*val.tar \(.*\).*complete"):
        prepare(path, labels, tmp_path / "out")


# --- hangs and memory -------------------------------------------------------------------------------------------


def test_non_regular_files_are_skipped_and_never_opened(tmp_path, no_hang):
    root = tmp_path / "d"
    write_image(root / WNIDS[0] / "good.JPEG")
    os.mkfifo(root / WNIDS[0] / "fifo.JPEG")
    os.mkfifo(root / "stray_fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / WNIDS[0] / "sock.JPEG"))
    os.symlink("loop.JPEG", root / WNIDS[0] / "loop.JPEG")
    os.symlink(tmp_path / "nowhere", root / WNIDS[1])
    (root / WNIDS[0] / "zero.JPEG").write_bytes(b"")
    found = discover(root)
    reasons = {s["path"]: s["reason"] for s in found.skipped}
    assert reasons[f"{WNIDS[0]}/fifo.JPEG"] == "not a regular file (a FIFO)"
    assert reasons[f"{WNIDS[0]}/sock.JPEG"] == "not a regular file (a socket)"
    assert reasons["stray_fifo"] == "not a regular file (a FIFO)"
    assert reasons[f"{WNIDS[0]}/loop.JPEG"] == "symlink loop"
    assert reasons[WNIDS[1]].startswith("broken symlink")
    assert reasons[f"{WNIDS[0]}/zero.JPEG"] == "empty file (0 bytes)"
    assert [s.id for s in found.samples] == [f"{WNIDS[0]}/good.JPEG"]
    with pytest.raises(decode.ImageRefused, match="not a regular file"):  # the decoder itself never blocks either
        decode.load_rgb(root / WNIDS[0] / "fifo.JPEG")
    sock.close()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: enough for the header check, nothing to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decoding_is_bounded_from_the_header(tmp_path):
    root = tmp_path / "d"
    write_image(root / WNIDS[0] / "good.JPEG")
    thin = root / WNIDS[0] / "thin.png"
    Image.new("L", (1, 300_000)).save(thin, optimize=True)  # a few hundred bytes; resized to 40 px wide: 12e6 px tall
    assert thin.stat().st_size < 1000
    (root / WNIDS[0] / "huge.png").write_bytes(_png_header(12_000, 12_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own bomb warning names no file: it must not appear
        outcome = evaluate(discover(root).samples, PRE, [_Logits("v")], workers=0)
    reasons = {s["path"]: s["reason"] for s in outcome.skipped}
    assert "aspect ratio beyond 1:25" in reasons[f"{WNIDS[0]}/thin.png"]
    assert "12000x12000 pixels (144 megapixels) is over the decode limit" in reasons[f"{WNIDS[0]}/huge.png"]
    assert outcome.predictions.image_ids == [f"{WNIDS[0]}/good.JPEG"]
    with pytest.raises(DatasetError, match="huge.png: 12000x12000"):
        evaluate(discover(root).samples, PRE, [_Logits("v")], workers=0, on_bad_image=OnBadImage.fail)


def test_large_jpeg_decodes_at_reduced_scale_and_normal_images_decode_as_before(tmp_path, monkeypatch):
    jpeg, png = tmp_path / "a.JPEG", tmp_path / "a.png"
    write_image(jpeg, size=(400, 300))
    write_image(png, size=(400, 300), fmt="PNG")

    def plain(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    for path in (jpeg, png):  # within the limit: exactly Pillow's full decode, even at 7x the resize target
        np.testing.assert_array_equal(np.asarray(decode.load_rgb(path, 40)), plain(path))
    monkeypatch.setattr(decode, "MAX_PIXELS", 10_000)
    assert decode.load_rgb(jpeg, 40).size == (100, 75)  # 1/4 scale: under the limit, short side still >= 40
    with pytest.raises(decode.ImageRefused, match="400x300 pixels .* over the decode limit"):
        decode.load_rgb(png, 40)  # PNG has no reduced-scale decode


def test_shared_sample_decodes_exactly_as_pillow(shared_sample):
    paths = sorted(shared_sample.glob("*/*"))[::40]
    for path in paths:
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(decode.load_rgb(path, 256)), np.asarray(im.convert("RGB")))


# --- silent wrong results ---------------------------------------------------------------------------------------


def test_sixteen_bit_grayscale_is_scaled_and_unknown_ranges_are_refused(tmp_path):
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(decode.load_rgb(tmp_path / "g16.png"))
    np.testing.assert_array_equal(rgb[..., 0], ramp >> 8)  # before: clipped to 255, all white
    assert rgb.std() > 50 and (rgb[..., 0] == rgb[..., 2]).all()

    Image.fromarray((ramp.astype(np.int32) * 3)).save(tmp_path / "i32.tif")
    Image.fromarray((ramp % 256).astype(np.int32)).save(tmp_path / "i8.tif")
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "f.tif")
    with pytest.raises(decode.ImageRefused, match="32-bit integer pixels from 0 to 193473"):
        decode.load_rgb(tmp_path / "i32.tif")
    with pytest.raises(decode.ImageRefused, match="floating-point pixels"):
        decode.load_rgb(tmp_path / "f.tif")
    np.testing.assert_array_equal(np.asarray(decode.load_rgb(tmp_path / "i8.tif"))[..., 1], ramp % 256)


def test_folders_in_a_class_folder_and_one_file_in_two_classes_are_not_evaluated(tmp_path):
    root = tmp_path / "d"
    write_image(root / WNIDS[0] / "a.JPEG", seed=1)
    write_image(root / WNIDS[0] / "sub" / "x.JPEG", seed=2)
    write_image(root / WNIDS[0] / ".cache" / "y.JPEG", seed=3)
    write_image(root / WNIDS[1] / "b.JPEG", seed=4)
    (root / WNIDS[2]).mkdir()
    os.link(root / WNIDS[1] / "b.JPEG", root / WNIDS[2] / "b_again.JPEG")
    os.symlink(root / WNIDS[0] / "a.JPEG", root / WNIDS[0] / "a_link.JPEG")
    found = discover(root)
    reasons = {s["path"]: s["reason"] for s in found.skipped}
    assert [s.id for s in found.samples] == [f"{WNIDS[0]}/a.JPEG"]
    assert reasons[f"{WNIDS[0]}/sub/"].startswith("folder inside a class folder")
    assert reasons[f"{WNIDS[0]}/.cache/"].startswith("hidden")
    assert reasons[f"{WNIDS[0]}/a_link.JPEG"] == f"the same file as {WNIDS[0]}/a.JPEG"
    assert "several class folders" in reasons[f"{WNIDS[1]}/b.JPEG"] and "several" in reasons[f"{WNIDS[2]}/b_again.JPEG"]


def _flat(tmp_path: Path, n: int = 2) -> Path:
    for i in range(1, n + 1):
        write_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    return tmp_path / "val"


def test_labels_listed_twice(tmp_path):
    val = _flat(tmp_path)
    same = _csv(tmp_path / "same.csv", [("ILSVRC2012_val_00000001", f"{WNIDS[0]} 1 2 3 4")] * 2)
    assert [s.label for s in discover(val, same).samples] == [1]  # the same class twice changes nothing
    conflict = _csv(tmp_path / "conflict.csv", [("ILSVRC2012_val_00000001", f"{WNIDS[0]} 1 2 3 4"),
                                                 ("ILSVRC2012_val_00000002", f"{WNIDS[0]} 1 2 3 4"),
                                                 ("ILSVRC2012_val_00000001", f"{WNIDS[1]} 1 2 3 4")])
    with pytest.raises(DatasetError, match=f"conflict.csv line 4: ILSVRC2012_val_00000001 is {WNIDS[1]}, but line 2 says {WNIDS[0]}"):
        discover(val, conflict)
    boxes = _csv(tmp_path / "boxes.csv", [("ILSVRC2012_val_00000001", f"{WNIDS[0]} 1 2 3 4 {WNIDS[1]} 5 6 7 8")])
    with pytest.raises(DatasetError, match="boxes.csv line 2: .*several classes"):
        discover(val, boxes)


def _calib_config(tmp_path, data, calib_data, calib_size, **kw):
    return RunConfig(model="tiny_test", data=data, out=tmp_path / "o", calib_data=calib_data, calib_size=calib_size,
                     recipes=(Recipe(backend=Backend.torch),), **kw)


def test_calibration_images_that_cannot_be_used_are_listed_and_counts_are_checked(tmp_path, image_folder):
    from int8eval.session import open_session

    calib_root = tmp_path / "calib"
    write_image(calib_root / WNIDS[0] / "ok.JPEG")
    (calib_root / WNIDS[0] / "bad.JPEG").write_bytes(b"junk")
    (calib_root / WNIDS[0] / "notes.txt").write_text("x")
    config = _calib_config(tmp_path, image_folder, calib_root, 2)
    session = open_session(config, config.recipes)
    assert session.calib.num_images == 1 and len(session.eval_samples) == 12
    assert {s["path"]: s["reason"] for s in session.skipped} == {
        f"{calib_root}/{WNIDS[0]}/notes.txt": "calibration: not an image file",
        f"{calib_root}/{WNIDS[0]}/bad.JPEG": f"calibration: UnidentifiedImageError: cannot identify image file '{calib_root / WNIDS[0] / 'bad.JPEG'}'",
    }
    with pytest.raises(DatasetError, match="cannot read calibration image .*bad.JPEG"):
        fail = _calib_config(tmp_path, image_folder, calib_root, 2, on_bad_image=OnBadImage.fail)
        open_session(fail, fail.recipes)

    with pytest.raises(DatasetError, match=r"--calib-size is 3\b.* holds 2 usable images: pass --calib-size 2"):
        three = _calib_config(tmp_path, image_folder, calib_root, 3)
        open_session(three, three.recipes)
    # --calib-data naming --data (another spelling) is the seeded split: calibration images are still never evaluated.
    same = _calib_config(tmp_path, image_folder, Path(f"{image_folder}/../data/"), 5)
    session = open_session(same, same.recipes)
    calib_ids, eval_ids = set(session.calib.image_ids), {s.id for s in session.eval_samples}
    assert "seeded split" in session.calib_source and len(calib_ids) == 5 and len(eval_ids) == 7
    assert not calib_ids & eval_ids
    with pytest.raises(DatasetError, match="--calib-size 12 leaves no images"):
        twelve = _calib_config(tmp_path, image_folder, image_folder, 12)
        open_session(twelve, twelve.recipes)


def test_run_lists_unreadable_calibration_images_in_the_report(tmp_path, image_folder):
    calib_root = tmp_path / "calib"
    for i in range(2):
        write_image(calib_root / WNIDS[1] / f"{i}.JPEG", seed=i)
    (calib_root / WNIDS[1] / "bad.JPEG").write_bytes(b"junk")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out),
                                       "--backend", "torch", "--calib-data", str(calib_root), "--calib-size", "3",
                                       "--max-images", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())["data"]
    assert data["calibration"]["num_images"] == 2  # before: 2, and bad.JPEG in neither list
    assert [s["path"] for s in data["skipped"]] == [f"{calib_root}/{WNIDS[1]}/bad.JPEG"]
    assert data["skipped"][0]["reason"].startswith("calibration: UnidentifiedImageError")


class _Logits:
    def __init__(self, name: str, nan_every: int = 0) -> None:
        self.name, self.nan_every = name, nan_every

    def predict(self, x):
        out = np.tile(np.arange(1000, dtype=np.float32), (len(x), 1))
        if self.nan_every:
            out[:: self.nan_every, 3] = np.nan
        return out


def test_non_finite_logits_are_never_ranked(image_folder):
    samples = discover(image_folder).samples
    outcome = evaluate(samples, PRE, [_Logits("ref"), _Logits("int8", nan_every=3)], reference="ref", batch_size=5)
    assert outcome.errors == {"int8": "non-finite logits (NaN or inf) for 5 of 12 images: not ranked"}
    assert set(outcome.predictions.top5) == {"ref"} and "int8" not in outcome.predictions.kl_to_ref
    class Background(_Logits):  # 1001 outputs: the TF-slim background class would shift every label by one
        def predict(self, x):
            return np.zeros((len(x), 1001), np.float32)

    outcome = evaluate(samples, PRE, [_Logits("ref"), Background("bg")], reference="ref", batch_size=5)
    assert outcome.errors == {"bg": "ValueError: logits of shape [5, 1001] for 5 images; the label space has 1000 classes"}
    with pytest.raises(ModelLoadError, match=r"reference ref gave non-finite logits \(NaN or inf\) for 2 of 5 images"):
        evaluate(samples, PRE, [_Logits("ref", nan_every=3)], reference="ref", batch_size=5)


@pytest.mark.parametrize(
    "args, first, second",
    [
        (["--fp32-only", "--keep-fp32", "fc"], "--keep-fp32", "--fp32-only"),
        (["--fp32-only", "--calib", "entropy"], "--calib", "--fp32-only"),
        (["--fp32-only", "--backend", "onnxruntime"], "--backend", "--fp32-only"),
        (["--fp32-only", "--calib-size", "5"], "--calib-size", "--fp32-only"),
        (["--fp32-only", "--max-drop", "1"], "--max-drop", "--fp32-only"),
        (["--backend", "torch", "--calib", "minmax", "--percentile", "99.9"], "--percentile", "--calib minmax"),
        (["--backend", "torch", "--train-data", "."], "--train-data", "--qat-epochs 0"),
        (["--backend", "torch", "--lr", "0.1"], "--lr", "--qat-epochs 0"),
        (["--backend", "torch", "--tensorrt-on-cpu"], "--tensorrt-on-cpu", "--backend torch"),
        (["--backend", "onnxruntime", "--legacy"], "--legacy", "--backend onnxruntime"),
        (["--backend", "torch", "--keep-fp32", "fc", "--sensitivity", "s.json"], "--sensitivity", "--keep-fp32 without topN"),
    ],
)
def test_a_flag_another_flag_disables_is_an_error(tmp_path, image_folder, args, first, second):
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert f"{first} has no effect with {second}" in message
    assert not (tmp_path / "o").exists()


def test_diagnose_and_bench_flags_that_do_nothing(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["diagnose", "-m", "tiny_test", "--percentile", "99.9", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--percentile has no effect with --calib minmax" in result.output
    result = runner.invoke(main, ["bench", "-m", "tiny_test", "--precision", "fp32", "--keep-fp32", "fc", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--keep-fp32 has no effect with --precision fp32" in result.output
    result = runner.invoke(main, ["reproduce", "seed", "--check", "--max-images", "5"])
    assert result.exit_code == 2 and "--max-images has no effect with --check" in result.output


# --- messages, not tracebacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "line 2: ILSVRC2012_val_00000001 has an empty PredictionString"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001\n", "line 2: 1 fields, expected ImageId,PredictionString"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,n01443537 1\nILSVRC2012_val_00000002,caf\xe9\n".encode("latin-1"),
         r"line 3 is not UTF-8 text \(byte 0xe9\)"),
        ("ImageId,PredictionString\n../ILSVRC2012_val_00000001,n01443537 1\n", "line 2: image id '../ILSVRC2012_val_00000001' is not a file name"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,n0144353\n", "line 2: class 'n0144353' .* is not a WordNet id"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,\"n01443537 1\nILSVRC2012_val_00000002,n01443537 1\n",
         r"line 3: not valid CSV \(unexpected end of data\)"),  # an open quote swallows the lines after it
    ],
)
def test_bad_loc_csv_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DatasetError, match=f"LOC_val_solution.csv {message}"):
        discover(_flat(tmp_path), path)


def test_loc_csv_with_bom_blank_lines_and_extra_columns_just_works(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_bytes("ImageId,PredictionString,Note\n\nILSVRC2012_val_00000001,n15075141 1 2 3 4,x\n".encode("utf-8-sig"))
    found = discover(_flat(tmp_path), path)
    assert [s.label for s in found.samples] == [999] and len(found.skipped) == 1


def _devkit(tmp_path: Path, gt: str, meta: bytes | None = None) -> Path:
    from scipy.io import savemat

    data = tmp_path / "devkit" / "data"
    data.mkdir(parents=True)
    if meta is None:
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
        rows = [(1, "n15075141", "t", "", 0), (2, "n01443537", "g", "", 0), (3, "n00000001", "not 1k", "", 0)]
        savemat(data / "meta.mat", {"synsets": np.array(rows, dtype=dtype)})
    else:
        (data / "meta.mat").write_bytes(meta)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(gt)
    return tmp_path / "devkit"


@pytest.mark.parametrize(
    "gt, meta, message",
    [
        ("1\nabc\n", None, r"ground_truth.txt line 2: 'abc' is not a class id"),
        ("1\n\n2\n", None, r"ground_truth.txt line 2: '' is not a class id"),  # would shift every later label
        ("1\n7\n", None, "ground_truth.txt line 2: class id 7 is not a leaf synset"),
        ("1\n3\n", None, "ground_truth.txt line 2: class id 3 is 'n00000001' in .*meta.mat, not an ImageNet-1k synset"),
        ("1\n2\n", b"MATLAB garbage", r"cannot read .*meta.mat \(MatReadError"),
        ("1\n2\n", "no synsets", r"cannot read .*meta.mat \(no 'synsets' table\)"),
    ],
)
def test_bad_devkit_names_file_and_line(tmp_path, gt, meta, message):
    if meta == "no synsets":
        from scipy.io import savemat

        buf = io.BytesIO()
        savemat(buf, {"other": np.zeros(3)})
        meta = buf.getvalue()
    with pytest.raises(DatasetError, match=message):
        discover(_flat(tmp_path), _devkit(tmp_path, gt, meta))


def test_truncated_devkit_tar_is_a_message(tmp_path):
    devkit = _devkit(tmp_path, "1\n2\n")
    path = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(devkit, arcname="ILSVRC2012_devkit_t12")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"cannot read .*ILSVRC2012_devkit_t12.tar.gz \(EOFError"):
        discover(_flat(tmp_path), path)


def test_no_images_says_why_each_entry_was_skipped(tmp_path):
    root = tmp_path / "d"
    (root / "cats").mkdir(parents=True)
    (root / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"2 entries skipped: 1 x folder name is not a WordNet id \(e.g. cats/\); "
                                           r"1 x file outside the synset folders \(e.g. notes.txt\)"):
        discover(root)
    write_image(tmp_path / "val" / f"{WNIDS[0]}" / "x.JPEG")
    labels = _csv(tmp_path / "LOC_val_solution.csv", [("x", f"{WNIDS[0]} 1")])
    with pytest.raises(DatasetError, match=r"with --labels the images sit directly in the data folder"):
        discover(tmp_path / "val", labels)


@pytest.mark.parametrize("content", ["{not json", '{"layers": []}', '{"ranking": "fc"}', '[1, 2]'])
def test_malformed_sensitivity_json_is_a_message(tmp_path, image_folder, content):
    (tmp_path / "s.json").write_text(content)
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--backend", "torch",
                                       "--keep-fp32", "top2", "--sensitivity", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"cannot read the ranking in {tmp_path / 's.json'}" in result.output


def test_nan_weights_are_refused_and_a_nan_reference_stops_the_run(tmp_path, image_folder):
    from int8eval.models import load_model

    state = load_model("tiny_test").module.state_dict()
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ModelLoadError, match="fc.bias holds 1000 NaN or inf values"):
        load_model("tiny_test", checkpoint=tmp_path / "nan.pt")
    # A NaN in a buffer passes the load (buffers may hold inf on purpose), then the reference's logits stop the run.
    state = load_model("tiny_test").module.state_dict()
    state["features.1.running_var"][0] = float("nan")
    torch.save(state, tmp_path / "nan_buffer.pt")
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--fp32-only",
                                       "--checkpoint", str(tmp_path / "nan_buffer.pt"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "reference torch-fp32 gave non-finite logits (NaN or inf) for 12 of 12 images" in result.output
