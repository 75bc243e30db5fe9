"""A deployment: one variant's deployable artifact copied into a folder with a manifest.json that says what it is
(backend, precision, the recipe, the model and its preprocessing, the int8eval version, a sha256 per file) and what
was measured of it. `int8eval tune` writes one per backend into RUN_DIR/deploy/<backend>/; a Recipe with `deployed=`
(`int8eval run --deployed DIR`) evaluates it again, on other images, with the backend's own runtime
(`backends.deployed`).

What each backend deploys (its Variant.artifact): PyTorch PT2E INT8 the saved exported program (.pt2); ONNX Runtime
and TensorRT's ONNX on the CPU the .onnx (and its external data files, if any); OpenVINO the IR (.xml and .bin);
TensorRT on a GPU the serialized engine (.engine). PyTorch FP32/BF16 and the legacy torch.ao INT8 are saved as
state_dicts, which need the model's code: they are not deployable.

Example:
    >>> write_deployment(Path("runs/tune/deploy/openvino"), variant, loaded, measured={"agreement_top1": 0.993})
    >>> load_deployment(Path("runs/tune/deploy/openvino")).recipe.name
    'openvino-int8-percentile99.999'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from int8eval import __version__
from int8eval.config import Backend, Precision, Preprocessing, Recipe
from int8eval.errors import ConfigError, ModelLoadError

MANIFEST = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeployedModel(_Strict):
    """The FP32 model the artifact was quantized from: `int8eval run --deployed` must be given the same one."""

    name: str
    source: str  # LoadedModel.source: where the weights came from
    checkpoint: str | None = None  # the --checkpoint file's path when the deployment was written
    checkpoint_sha256: str | None = None


class DeployedFile(_Strict):
    name: str  # a file name in the deployment folder (no folders)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or v in (".", "..", MANIFEST) or "/" in v or "\\" in v:
            raise ValueError(f"{v!r} is not a plain file name of the deployment folder")
        return v


class DeployManifest(_Strict):
    """manifest.json of a deployment folder (see the module docstring)."""

    manifest_version: Literal[1] = 1
    int8eval_version: str
    created: str  # ISO 8601, UTC
    backend: Backend
    precision: Precision
    variant: str  # the variant's name where it was measured and chosen
    recipe: Recipe  # how it was built
    model: DeployedModel
    preprocessing: Preprocessing  # what its input must be: the images are prepared this way before predict
    entry: str  # the file the runtime loads (one of `files`)
    files: tuple[DeployedFile, ...] = Field(min_length=1)
    details: dict[str, Any] | None = None  # the variant's build provenance (Variant.details)
    measured: dict[str, Any] = Field(default_factory=dict)  # what the writer measured (accuracy, speed, size)

    @model_validator(mode="after")
    def _consistent(self) -> DeployManifest:
        if self.recipe.backend is not self.backend or self.recipe.precision is not self.precision:
            raise ValueError(
                f"backend/precision {self.backend.value}/{self.precision.value} differ from the recipe's "
                f"{self.recipe.backend.value}/{self.recipe.precision.value}"
            )
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError(f"files lists a file twice: {names}")
        if self.entry not in names:
            raise ValueError(f"entry {self.entry!r} is not one of files {names}")
        return self


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Writing


def artifact_files(variant) -> list[Path]:
    """The files of `variant`'s deployable artifact, its entry first (see the module docstring); ConfigError for a
    variant that has none."""
    artifact = Path(variant.artifact) if getattr(variant, "artifact", None) is not None else None
    if artifact is None or not artifact.is_file():
        raise ConfigError(f"{variant.name} has no artifact file to deploy (artifact: {artifact})")
    suffix = artifact.suffix
    if suffix == ".xml":  # OpenVINO IR: the weights are the .bin beside it
        return [artifact, artifact.with_suffix(".bin")]
    if suffix == ".onnx":
        return [artifact, *_onnx_external_data(artifact)]
    if suffix in (".pt2", ".engine"):
        return [artifact]
    raise ConfigError(
        f"{variant.name} cannot be deployed: its artifact {artifact.name} is a PyTorch state_dict, which needs the "
        "model's code (PyTorch FP32/BF16 and the legacy torch.ao INT8); deploy its PT2E INT8 (a .pt2) instead"
    )


def _onnx_external_data(model: Path) -> list[Path]:
    """The external data files an .onnx names (large models keep their weights beside the graph)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load_model(str(model), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return [model.parent / loc for loc in sorted(locations)]


def write_deployment(
    dest: Path, variant, loaded, *, measured: dict, checkpoint: Path | None = None
) -> Path:
    """Copy `variant`'s deployable artifact into `dest` with its manifest.json; returns the manifest's path.

    `loaded` is the LoadedModel the variant was built from (its name, source and preprocessing are recorded),
    `checkpoint` the --checkpoint file it was loaded with, if any (its sha256 is recorded), `measured` what the caller
    measured of it (free-form; numpy values become plain JSON). The folder is written beside `dest`, each file
    fsync'd, and renamed into place complete (a previous deployment moved aside first), so `dest` never mixes two
    deployments; a `dest` that holds anything but a deployment is refused rather than replaced.
    """
    from int8eval.report.folder import write_atomic

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST).is_file())):
        raise ConfigError(f"{dest} holds something other than a deployment: give an empty or new folder")
    files = artifact_files(variant)
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"{variant.name}: {missing[0]} is missing, so its artifact cannot be deployed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        listed = []
        for src in files:
            with open(src, "rb") as f:
                write_atomic(staging / src.name, lambda out, f=f: shutil.copyfileobj(f, out, 1 << 20))
            copied = staging / src.name
            listed.append(DeployedFile(name=src.name, sha256=file_sha256(copied), bytes=copied.stat().st_size))
        manifest = DeployManifest(
            int8eval_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            backend=variant.recipe.backend,
            precision=variant.recipe.precision,
            variant=variant.name,
            recipe=variant.recipe,
            model=DeployedModel(
                name=loaded.name, source=loaded.source,
                checkpoint=str(Path(checkpoint).resolve()) if checkpoint is not None else None,
                checkpoint_sha256=file_sha256(Path(checkpoint)) if checkpoint is not None else None,
            ),
            preprocessing=loaded.preprocessing,
            entry=files[0].name,
            files=tuple(listed),
            details=_json_ready(variant.details) if variant.details else None,
            measured=_json_ready(measured),
        )
        write_atomic(staging / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        _swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest / MANIFEST


def _json_ready(value: dict) -> dict:
    # numpy numbers and arrays (what measurements are made of) as plain JSON; anything else as its text.
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _swap_in(staging: Path, dest: Path) -> None:
    """Put the complete folder `staging` at `dest`; a previous deployment there is moved aside, then deleted."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Reading


def load_deployment(folder: Path, *, verify: bool = True) -> DeployManifest:
    """The manifest of the deployment in `folder`, every file it lists checked against its sha256 (`verify`).

    ConfigError when `folder` is not a deployment; ModelLoadError naming the file and the field for a manifest that
    cannot be read, and naming the file for one that is missing or whose sha256 differs (changed or tampered)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"holds no {MANIFEST}"
        raise ConfigError(
            f"deployment {folder} {what}: give a folder written by `int8eval tune` (RUN_DIR/deploy/BACKEND)"
        )
    try:
        manifest = DeployManifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors()[:5])
        raise ModelLoadError(f"{path} is not a valid deployment manifest ({errs})") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if verify:
        for f in manifest.files:
            p = folder / f.name
            if not p.is_file():
                raise ModelLoadError(f"{p} is missing, but {path} lists it: the deployment is incomplete")
            if p.stat().st_size != f.bytes or file_sha256(p) != f.sha256:
                raise ModelLoadError(
                    f"{p} is not the file {path} was written with (its sha256 differs): it was changed after the "
                    "deployment was written; write the deployment again"
                )
    return manifest


def check_model(manifest: DeployManifest, folder: Path, model: str, checkpoint: Path | None) -> None:
    """ConfigError naming both when `model` (and `checkpoint`) are not what the deployment was built from: its
    accuracy is paired with, and its FP32 gate built from, the model given."""
    m = manifest.model
    given = model + (f" with --weights-file {checkpoint}" if checkpoint is not None else "")
    built = m.name + (f" with checkpoint {m.checkpoint}" if m.checkpoint else "")
    if model != m.name or (checkpoint is None) != (m.checkpoint_sha256 is None):
        raise ConfigError(f"deployment {folder} was built from {built}, not {given}: give the model it was built from")
    if checkpoint is not None and Path(checkpoint).is_file() and file_sha256(Path(checkpoint)) != m.checkpoint_sha256:
        raise ConfigError(
            f"deployment {folder} was built from {built}, not {given} (the checkpoints' sha256 differ): give the "
            "checkpoint it was built from"
        )


def deployment_recipes(
    folders: tuple[Path, ...] | list[Path], model: str, checkpoint: Path | None = None
) -> tuple[tuple[Recipe, ...], Preprocessing | None]:
    """The recipes that evaluate the deployments in `folders` and the preprocessing they share (None: no folders).
    Each is checked (`load_deployment`) and must be built from `model` and `checkpoint` (`check_model`)."""
    recipes, preprocessing = [], None
    for folder in folders:
        manifest = load_deployment(folder)
        check_model(manifest, folder, model, checkpoint)
        if preprocessing is not None and manifest.preprocessing != preprocessing:
            raise ConfigError(
                f"deployment {folder} prepares its images otherwise ({manifest.preprocessing}) than {folders[0]} "
                f"({preprocessing}): evaluate them in separate runs"
            )
        preprocessing = manifest.preprocessing
        recipes.append(
            Recipe(backend=manifest.backend, precision=manifest.precision, emulate=manifest.recipe.emulate,
                   deployed=Path(folder))
        )
    return tuple(recipes), preprocessing
