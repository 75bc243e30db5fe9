"""The one-pass engine (`evaluate`) with stub variants of known logits: every expected value is computed here,
independently of the engine (scipy's softmax / rel_entr / cosine, Python's sorted), so a wrong top-5 order,
misaligned labels, a flipped KL, a zeroed cosine, a failure that stops the pass or an array missing from
predictions.npz each fail a test.

Each image is one flat colour whose red channel encodes its number k; a stub variant reads k back from the pixels
and answers the logits row k of its table. The samples are shuffled, so labels can only line up with predictions if
the engine keeps them together.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.progress import Progress
from scipy.spatial.distance import cosine as cosine_distance
from scipy.special import rel_entr, softmax

from int8eval.backends import Variant
from int8eval.config import OnBadImage, Preprocessing, Recipe
from int8eval.data.layouts import Sample
from int8eval.errors import DatasetError
from int8eval.evaluate import Predictions, Remembered, decode_set, evaluate

N = 13  # not a multiple of the batch size: the last batch is short
CLASSES = 1000
# No resize artefacts on a flat image, and no normalisation: the pixel is red / 255 exactly.
PRE = Preprocessing(resize=4, crop=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
REF = "ref"
TIES = "ties::v2"


def _red(k: int) -> int:
    return 10 * k + 5


def image_number(images: np.ndarray) -> np.ndarray:
    """k of each image of a preprocessed batch (the inverse of `_red`)."""
    red = images[:, 0].reshape(len(images), -1).mean(axis=1) * 255
    return np.rint((red - 5) / 10).astype(int)


class TableVariant(Variant):
    """Answers row k of `table` for image k; `fail_on_call` raises on that call (1-based) and after. `inside_s`
    adds up the time spent inside predict, which the engine's own count must include."""

    def __init__(self, name: str, table: np.ndarray, fail_on_call: int | None = None) -> None:
        super().__init__(Recipe(backend="torch", precision="fp32"))
        self._name, self.table, self.fail_on_call, self.calls = name, table, fail_on_call, 0
        self.inside_s = 0.0

    @property
    def name(self) -> str:
        return self._name

    def predict(self, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError(f"{self._name} broke on call {self.calls}")
        time.sleep(0.002)
        out = self.table[image_number(images)]
        self.inside_s += time.perf_counter() - start
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """N flat-colour PNGs (lossless), a distinct random label per image, the samples in shuffled order, and the
    logits tables of the variants."""
    root = tmp_path_factory.mktemp("engine")
    rng = np.random.default_rng(17)
    labels = rng.choice(CLASSES, N, replace=False)
    samples = []
    for k in rng.permutation(N):
        path = root / f"img{k:02d}.png"
        Image.new("RGB", (6, 5), (_red(int(k)), 7, 200)).save(path)
        samples.append(Sample(path, int(labels[k]), f"img{k:02d}.png"))
    ref = rng.standard_normal((N, CLASSES)) * 3
    ref[0] *= 300  # logits near +-3000: a softmax without the max subtracted overflows
    other = ref + rng.standard_normal((N, CLASSES)) * np.linspace(0.2, 2.0, N)[:, None]
    other[1] = 0.0  # a zero vector: cosine must stay finite (0), not divide by zero
    other[2] *= 1e-5  # tiny logits: the product of the norms is below 1, and still no clamp may touch it
    # "oracle" ranks each image's true label at position k % 6 (5: outside the top-5).
    oracle = rng.standard_normal((N, CLASSES))
    for k in range(N):
        top = 100.0 - np.arange(6)
        others = [c for c in rng.permutation(CLASSES) if c != labels[k]][:5]
        ranked = others[: k % 6] + [labels[k]] + others[k % 6 :]
        oracle[k, ranked] = top
    # Ties: the engine breaks them by class index (a stable sort; numpy's default sort scrambles 30 equal values).
    ties = np.zeros((N, CLASSES))
    ties[:, rng.choice(CLASSES, 30, replace=False)] = 1.0
    ties[:, 7] = 2.0
    # "::" in a name: predictions.npz keys are "<table>::<name>" and the name must come back whole.
    tables = {n: t.astype(np.float32) for n, t in (("ref", ref), ("other", other), ("oracle", oracle), (TIES, ties))}
    return {"samples": samples, "labels": labels, "tables": tables, "root": root}


def _run(world, variants, **kw):
    return evaluate(world["samples"], PRE, variants, reference=REF, batch_size=4, workers=0, **kw)


@pytest.fixture  # per test: mutmut maps each test to the code it runs, and a shared result hides that
def outcome(world):
    variants = [TableVariant(n, t) for n, t in world["tables"].items()]
    return _run(world, variants)


def _k_of(preds: Predictions) -> np.ndarray:
    return np.array([int(i[3:5]) for i in preds.image_ids])


def _top5(row: np.ndarray) -> list[int]:
    return sorted(range(len(row)), key=lambda c: (-float(row[c]), c))[:5]


def test_images_keep_their_labels_in_sample_order(world, outcome):
    preds = outcome.predictions
    assert preds.image_ids == [s.id for s in world["samples"]]
    k = _k_of(preds)
    np.testing.assert_array_equal(preds.labels, world["labels"][k])
    assert preds.labels.dtype == np.int64
    assert outcome.errors == {} and outcome.skipped == []


def test_top5_is_in_descending_order_of_the_logits(world, outcome):
    preds = outcome.predictions
    k = _k_of(preds)
    for name, table in world["tables"].items():
        expected = np.array([_top5(table[i]) for i in k])
        np.testing.assert_array_equal(preds.top5[name], expected, err_msg=name)
        np.testing.assert_array_equal(preds.top1(name), expected[:, 0])
    assert preds.top5[TIES].dtype == np.int16


def test_correct1_and_correct5_follow_the_rank_of_the_true_label(outcome):
    preds = outcome.predictions
    rank = _k_of(preds) % 6  # where "oracle" put the true label
    np.testing.assert_array_equal(preds.correct1("oracle"), rank == 0)
    np.testing.assert_array_equal(preds.correct5("oracle"), rank < 5)


def test_kl_is_kl_of_the_reference_to_the_variant(world, outcome):
    preds = outcome.predictions
    k = _k_of(preds)
    ref = world["tables"]["ref"].astype(np.float64)[k]
    other = world["tables"]["other"].astype(np.float64)[k]
    p, q = softmax(ref, axis=1), softmax(other, axis=1)
    expected = rel_entr(p, q).sum(axis=1)  # KL(P_ref || P_variant)
    reverse = rel_entr(q, p).sum(axis=1)
    assert np.abs(expected - reverse).max() > 0.1  # the two directions are told apart by this data
    kl = preds.kl_to_ref["other"]
    assert kl.dtype == np.float32 and preds.cos_to_ref["other"].dtype == np.float32 and np.isfinite(kl).all() and (kl >= 0).all()
    np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-6)
    assert REF not in preds.kl_to_ref and REF not in preds.cos_to_ref
    assert set(preds.kl_to_ref) == set(preds.cos_to_ref) == {"other", "oracle", TIES}


def test_cosine_similarity_of_the_logits(world, outcome):
    preds = outcome.predictions
    k = _k_of(preds)
    for name in ("other", "oracle", TIES):
        ref, var = world["tables"]["ref"].astype(np.float64)[k], world["tables"][name].astype(np.float64)[k]
        expected = [0.0 if not v.any() else 1.0 - cosine_distance(r, v) for r, v in zip(ref, var)]
        np.testing.assert_allclose(preds.cos_to_ref[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(preds.cos_to_ref["other"]).max() > 0.5  # not a zeroed cosine


def test_identical_logits_give_zero_kl_and_unit_cosine(world):
    twin = TableVariant("twin", world["tables"]["ref"])
    preds = _run(world, [TableVariant(REF, world["tables"]["ref"]), twin]).predictions
    np.testing.assert_allclose(preds.kl_to_ref["twin"], 0.0, atol=1e-6)
    np.testing.assert_allclose(preds.cos_to_ref["twin"], 1.0, atol=1e-6)


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_a_failing_variant_stops_alone(world, outcome, fail_on_call):
    tables = world["tables"]
    broken = TableVariant("broken", tables["other"], fail_on_call=fail_on_call)
    run = _run(world, [TableVariant(n, t) for n, t in tables.items()][:2] + [broken, TableVariant(TIES, tables[TIES])])
    assert run.errors == {"broken": f"RuntimeError: broken broke on call {fail_on_call}"}
    assert broken.calls == fail_on_call  # dropped after its failure, not called again
    preds, full = run.predictions, outcome.predictions
    assert "broken" not in preds.top5 and "broken" not in preds.kl_to_ref and "broken" not in preds.cos_to_ref
    assert set(preds.top5) == {REF, "other", TIES}
    for name in ("ref", "other", TIES):
        np.testing.assert_array_equal(preds.top5[name], full.top5[name])
    for name in ("other", TIES):
        np.testing.assert_array_equal(preds.kl_to_ref[name], full.kl_to_ref[name])
        np.testing.assert_array_equal(preds.cos_to_ref[name], full.cos_to_ref[name])
    np.testing.assert_array_equal(preds.labels, full.labels)
    assert set(run.predict_s) >= {REF, "other", TIES}


def test_predict_time_adds_up_every_batch(world):
    variants = [TableVariant(REF, world["tables"]["ref"]), TableVariant("other", world["tables"]["other"])]
    before = time.perf_counter()
    run = _run(world, variants)
    assert 0 < run.seconds <= time.perf_counter() - before  # the pass's own duration, within the call's
    assert variants[0].calls == 4  # 13 images in batches of 4
    for v in variants:
        # At least what the variant spent inside predict over all its calls, at most the whole pass.
        assert v.inside_s <= run.predict_s[v.name] <= run.seconds, (v.name, v.inside_s, run.predict_s)


def test_a_set_decoded_once_and_a_remembered_reference_give_the_same_predictions(world, outcome):
    """tune evaluates the same images many times: decoded once, the reference run once per batch, and every array
    of the predictions as a fresh pass gives them."""
    decoded = decode_set(world["samples"], PRE, batch_size=4, workers=0)
    ref = TableVariant(REF, world["tables"][REF])
    remembered = Remembered(ref)
    for attempt in range(2):
        others = [TableVariant(n, t) for n, t in world["tables"].items() if n != REF]
        again = _run(world, [remembered, *others], decoded=decoded).predictions
        assert ref.calls == len(decoded), f"pass {attempt}: the reference ran again on batches it had seen"
        assert again.image_ids == outcome.predictions.image_ids
        for table in ("top5", "kl_to_ref", "cos_to_ref"):
            for name, a in getattr(outcome.predictions, table).items():
                np.testing.assert_array_equal(getattr(again, table)[name], a, err_msg=f"{table} {name}")
    fresh = [np.array(b.images, copy=True) for b in decoded]  # equal values, other arrays: computed, not looked up
    for images in fresh:
        remembered.predict(images)
    assert ref.calls == 2 * len(decoded)


class StaticShapes(TableVariant):
    """A variant compiled for one batch shape (as inductor's PT2E INT8 is): records the batch sizes it is given."""

    static_shapes = True

    def __init__(self, name: str, table: np.ndarray) -> None:
        super().__init__(name, table)
        self.sizes: list[int] = []

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        return super().predict(images)


def test_a_variant_compiled_for_static_shapes_sees_only_whole_batches_and_keeps_its_rows(world, outcome):
    """The short last batch (13 images in batches of 4) is padded for it, never for the others, and its predictions
    are those of the unpadded pass, row for row."""
    static = StaticShapes("other", world["tables"]["other"])
    plain = TableVariant(REF, world["tables"][REF])
    sizes: list[int] = []
    plain_predict = plain.predict
    plain.predict = lambda images: (sizes.append(len(images)), plain_predict(images))[1]
    run = _run(world, [plain, static]).predictions
    assert static.sizes == [4, 4, 4, 4] and sizes == [4, 4, 4, 1]
    for table in ("top5", "kl_to_ref", "cos_to_ref"):
        np.testing.assert_array_equal(getattr(run, table)["other"], getattr(outcome.predictions, table)["other"])


class Killed(BaseException):
    """Stands for a kill: not an Exception, so the engine does not record it as one variant's failure."""


class KilledAt(TableVariant):
    def __init__(self, name, table, kill_on_call: int) -> None:
        super().__init__(name, table)
        self.kill_on_call = kill_on_call

    def predict(self, images):
        if self.calls + 1 >= self.kill_on_call:
            raise Killed
        return super().predict(images)


def _assert_same(a: Predictions, b: Predictions) -> None:
    assert a.image_ids == b.image_ids
    np.testing.assert_array_equal(a.labels, b.labels)
    for table in ("top5", "kl_to_ref", "cos_to_ref"):
        assert set(getattr(a, table)) == set(getattr(b, table)), table
        for name, arr in getattr(b, table).items():
            np.testing.assert_array_equal(getattr(a, table)[name], arr, err_msg=f"{table} {name}")


@pytest.mark.parametrize("kill_on_call", [2, 3, 4])
def test_a_pass_killed_and_resumed_from_its_checkpoint_gives_the_same_predictions(world, tmp_path, kill_on_call):
    """13 images, batches of 4, a checkpoint every 8 images: killed in its 2nd, 3rd or 4th batch, the rerun takes
    the saved images from the checkpoint, evaluates only the rest, and the predictions equal an uninterrupted pass;
    a variant that failed before the kill stays failed."""
    from int8eval.resume import EvalCheckpoint

    tables = world["tables"]
    names = [REF, "other", TIES]

    def variants(kill=None):
        vs = [TableVariant(n, tables[n]) for n in names] + [TableVariant("broken", tables["other"], fail_on_call=1)]
        if kill:
            vs[0] = KilledAt(REF, tables[REF], kill)
        return vs

    whole = _run(world, variants())
    checkpoint = EvalCheckpoint(tmp_path, every=8, say=print)
    with pytest.raises(Killed):
        _run(world, variants(kill_on_call), checkpoint=checkpoint)
    saved = checkpoint.load()
    assert (saved["done"] if saved else 0) == (8 if kill_on_call > 2 else 0)
    again = variants()
    resumed = _run(world, again, checkpoint=checkpoint)
    _assert_same(resumed.predictions, whole.predictions)
    assert resumed.errors == whole.errors == {"broken": "RuntimeError: broken broke on call 1"}
    # Only the batches after the checkpoint, and the first batch again: rebuilt models must reproduce it.
    assert again[0].calls == (1 + 2 if kill_on_call > 2 else 4)
    assert again[3].calls == (0 if kill_on_call > 2 else 1)  # failed before the kill: not called again
    assert checkpoint.load()["done"] == N  # the last save covers every image


def test_a_variant_that_predicts_otherwise_after_the_kill_is_evaluated_from_the_first_image(world, tmp_path):
    from int8eval.resume import EvalCheckpoint

    tables = world["tables"]
    said = []
    checkpoint = EvalCheckpoint(tmp_path, every=8, say=said.append)
    with pytest.raises(Killed):
        _run(world, [KilledAt(REF, tables[REF], 3), TableVariant("other", tables["other"])], checkpoint=checkpoint)
    assert checkpoint.load()["done"] == 8
    rebuilt = [TableVariant(REF, tables[REF]), TableVariant("other", tables["oracle"])]  # built otherwise
    resumed = _run(world, rebuilt, checkpoint=checkpoint)
    assert len(said) == 1 and said[0].startswith("--resume: other now predict") and "first image" in said[0]
    _assert_same(resumed.predictions, _run(world, [TableVariant(REF, tables[REF]),
                                                   TableVariant("other", tables["oracle"])]).predictions)


def test_a_checkpoint_must_hold_whole_batches(world, tmp_path):
    from int8eval.resume import EvalCheckpoint

    with pytest.raises(ValueError, match="every=6, batch_size=4"):
        _run(world, [TableVariant(REF, world["tables"][REF])], checkpoint=EvalCheckpoint(tmp_path, every=6, say=print))


def test_predictions_file_round_trip(outcome, tmp_path):
    preds = outcome.predictions
    path = tmp_path / "predictions.npz"
    preds.save(path)
    with np.load(path) as z:
        keys = set(z.files)
    names = ("other", "oracle", TIES)
    assert keys == {"image_ids", "labels"} | {f"top5::{n}" for n in (REF, *names)} | {
        f"{p}::{n}" for p in ("kl", "cos") for n in names
    }
    back = Predictions.load(path)
    assert back.image_ids == preds.image_ids and all(isinstance(i, str) for i in back.image_ids)
    np.testing.assert_array_equal(back.labels, preds.labels)
    for table in ("top5", "kl_to_ref", "cos_to_ref"):
        ours, theirs = getattr(preds, table), getattr(back, table)
        assert set(ours) == set(theirs), table
        for name in ours:
            np.testing.assert_array_equal(theirs[name], ours[name])
            assert theirs[name].dtype == ours[name].dtype
    np.testing.assert_array_equal(back.correct5("oracle"), preds.correct5("oracle"))


def _with_broken_image(world, tmp_path: Path) -> list[Sample]:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    samples = list(world["samples"])
    samples.insert(5, Sample(bad, 1, "broken.png"))
    return samples


def test_bad_images_are_skipped_and_counted(world, tmp_path):
    samples = _with_broken_image(world, tmp_path)
    with Progress(disable=True) as progress:
        run = evaluate(samples, PRE, [TableVariant(REF, world["tables"]["ref"])], reference=REF, batch_size=4,
                       workers=0, progress=progress)
        (task,) = progress.tasks
        assert task.completed == len(samples) == task.total and task.description == "evaluating"
    assert [s["path"] for s in run.skipped] == ["broken.png"] and run.skipped[0]["reason"]
    assert run.predictions.image_ids == [s.id for s in world["samples"]]
    np.testing.assert_array_equal(run.predictions.labels, [s.label for s in world["samples"]])
    assert run.seconds > 0


def test_bad_image_fails_the_run_when_asked(world, tmp_path):
    samples = _with_broken_image(world, tmp_path)
    with pytest.raises(DatasetError, match="broken.png"):
        evaluate(samples, PRE, [TableVariant(REF, world["tables"]["ref"])], reference=REF, batch_size=4,
                 workers=0, on_bad_image=OnBadImage.fail)


def test_no_readable_image_is_an_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    with pytest.raises(DatasetError, match="none of the 1 images"):
        evaluate([Sample(bad, 0, "x.png")], PRE, [TableVariant(REF, np.zeros((1, CLASSES)))], reference=REF)


def test_predictions_file_that_is_missing_or_inconsistent_is_refused(outcome, tmp_path):
    from int8eval.errors import RunFolderError

    with pytest.raises(RunFolderError, match="nowhere.npz is missing"):
        Predictions.load(tmp_path / "nowhere.npz")
    preds = outcome.predictions
    for broken in (
        Predictions(preds.image_ids[:-1], preds.labels, preds.top5),  # one id short
        Predictions(preds.image_ids, preds.labels, {REF: preds.top5[REF][:-1]}),  # a short top-5 table
        Predictions(preds.image_ids, preds.labels[:, None], preds.top5),  # labels of the wrong shape
    ):
        broken.save(tmp_path / "p.npz")
        with pytest.raises(RunFolderError, match="inconsistent"):
            Predictions.load(tmp_path / "p.npz")


def test_unreadable_predictions_file_is_refused(tmp_path):
    from int8eval.errors import RunFolderError

    (tmp_path / "p.npz").write_bytes(b"PK\x03\x04 truncated")
    error = r"\((BadZipFile|OSError|ValueError|EOFError): .* not a predictions file; re-run to write it again$"
    with pytest.raises(RunFolderError, match=r"p.npz cannot be read " + error):
        Predictions.load(tmp_path / "p.npz")


def test_nothing_to_evaluate_is_an_error():
    message = "^no images to evaluate: every image found was used for calibration or training$"
    with pytest.raises(DatasetError, match=message):
        evaluate([], PRE, [TableVariant(REF, np.zeros((1, CLASSES)))], reference=REF)


def _with_nan(world, positions: list[int]) -> np.ndarray:
    """The reference table with a NaN logit for the images at these positions of the (shuffled) sample list."""
    table = world["tables"]["ref"].copy()
    for i in positions:
        table[int(world["samples"][i].id[3:5]), 3] = np.nan
    return table


def test_non_finite_logits_drop_the_variant_and_count_every_batch(world, outcome):
    nan = TableVariant("nan", _with_nan(world, [0, 1, 5]))  # two images in the first batch of 4, one in the second
    run = _run(world, [TableVariant(REF, world["tables"]["ref"]), nan, TableVariant("other", world["tables"]["other"])])
    assert run.errors == {"nan": f"non-finite logits (NaN or inf) for 3 of {N} images: not ranked"}
    assert "nan" not in run.predictions.top5 and "nan" not in run.predictions.kl_to_ref
    np.testing.assert_array_equal(run.predictions.kl_to_ref["other"], outcome.predictions.kl_to_ref["other"])


def test_non_finite_reference_names_the_first_bad_image(world):
    from int8eval.errors import ModelLoadError

    bad = world["samples"][6]  # the third image of the second batch
    with pytest.raises(ModelLoadError, match=rf"reference ref gave non-finite logits \(NaN or inf\) for 1 of 4 images "
                       rf"\(first: {bad.id}\): its weights are broken"):
        _run(world, [TableVariant(REF, _with_nan(world, [6]))])
