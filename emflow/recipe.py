"""The recipe: one YAML file describing an ingest, validated into typed models.

One pydantic model per stage (source, voxel size, outputs, pyramid, depth,
align, enhance, run), composed into a frozen :class:`Recipe`. Unknown keys are
rejected; every validation problem becomes a :class:`~emflow.errors.RecipeError`
naming the YAML path (``outputs.0.encoding``) and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emflow.errors import RecipeError

#: the run folder inside output_dir; no output may take its name
RUN_FOLDER = "emflow-run"
#: suffix of an output while it is being written
PARTIAL_SUFFIX = ".partial"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_output_name(name: str) -> str:
    """An output name is one plain folder name inside output_dir: no separators, no '..'."""
    bad = None
    if not name or not name.strip():
        bad = "is empty"
    elif name != name.strip():
        bad = "starts or ends with white space"
    elif "/" in name or "\\" in name or "\0" in name:
        bad = "contains a path separator; give a plain folder name (it is created in output_dir)"
    elif name in (".", ".."):
        bad = "is not a folder name"
    elif name.lower() == RUN_FOLDER or name.lower().startswith(RUN_FOLDER + "."):
        bad = f"is the name of emflow's run folder ({RUN_FOLDER})"
    elif name.endswith(PARTIAL_SUFFIX):
        bad = f"ends with '{PARTIAL_SUFFIX}', which marks outputs still being written"
    if bad:
        raise ValueError(f"output name {name!r} {bad}")
    return name


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS.update({_p: 1000**_i, _p + "b": 1000**_i, _p + "i": 1024**_i, _p + "ib": 1024**_i})


def parse_memory(value: str) -> int:
    """Bytes of a memory string such as '4GiB', '8 GB' or '500MB' (the forms Dask accepts)."""
    m = _MEMORY.match(str(value))
    unit = _UNITS.get(m.group(3).lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"{value!r} is not a memory size; write e.g. '4GiB', '8GB' or '500MB'")
    n = float(m.group(1)) * 10 ** int(m.group(2) or 0) * unit
    if n < 1:
        raise ValueError(f"{value!r} is not a memory size; write e.g. '4GiB', '8GB' or '500MB'")
    return int(n)


class Source(_Model):
    """Where the slices are: a printf pattern with a z range, a glob, or a directory."""

    pattern: str | None = Field(None, description="printf pattern, e.g. 'raw/img%05d.png'")
    z_start: int | None = Field(None, ge=0, description="first z (inclusive)")
    z_stop: int | None = Field(None, ge=0, description="last z (exclusive)")
    glob: str | None = Field(None, description="glob, e.g. 'raw/*.tif' (natural sort)")
    directory: str | None = Field(None, description="every image file in this directory")
    missing: Literal["error", "fill_zero", "fill_previous"] = "error"

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        kinds = [k for k in ("pattern", "glob", "directory") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of 'pattern' (with z_start/z_stop), 'glob' or 'directory'"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        if self.pattern is not None:
            if "%" not in self.pattern:
                raise ValueError("'pattern' needs a printf field for z, e.g. 'img%05d.png'")
            if self.z_start is None or self.z_stop is None:
                raise ValueError("'pattern' needs 'z_start' and 'z_stop' (stop exclusive)")
        if self.z_start is not None and self.z_stop is not None and self.z_stop <= self.z_start:
            raise ValueError(
                f"z_stop ({self.z_stop}) must be greater than z_start ({self.z_start})"
            )
        return self


Xyz = tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]


class PrecomputedOutput(_Model):
    """A neuroglancer precomputed volume (raw or JPEG chunks, optionally sharded)."""

    format: Literal["precomputed"]
    name: str = "precomputed"
    encoding: Literal["raw", "jpeg"] = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    sharded: bool = True
    chunk_size_xyz: Xyz = (64, 64, 64)
    shard_chunks_max: int = Field(
        4096, ge=1, description="upper bound on chunks per shard file (power of 2 used)"
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_output_name(v)


class OmeZarrOutput(_Model):
    """An OME-Zarr multiscale image: 0.4 (Zarr v2) or 0.5 (Zarr v3, sharded)."""

    format: Literal["omezarr"]
    name: str = "omezarr"
    version: Literal["0.4", "0.5"] = "0.5"
    chunk_size_xyz: Xyz = (64, 64, 64)
    shard_size_xyz: Xyz | None = Field(
        None, description="0.5 only; default: whole slab depth and up to 1024 px in x and y"
    )
    codec: Literal["zstd", "blosc-zstd", "none"] = "zstd"
    codec_level: int = Field(1, ge=0, le=22)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_output_name(v)

    @model_validator(mode="after")
    def _shards(self) -> OmeZarrOutput:
        if self.version == "0.4" and self.shard_size_xyz is not None:
            raise ValueError("shard_size_xyz needs version '0.5' (Zarr v2 has no sharding)")
        if self.shard_size_xyz is not None:
            for c, s, ax in zip(self.chunk_size_xyz, self.shard_size_xyz, "xyz", strict=True):
                if s % c:
                    raise ValueError(f"shard_size_xyz {ax}={s} is not a multiple of chunk {c}")
        return self


Output = Annotated[PrecomputedOutput | OmeZarrOutput, Field(discriminator="format")]


class Pyramid(_Model):
    """Multiscale pyramid: mean downsampling by 2, finest axes first until near-isotropic."""

    levels: int | None = Field(
        None, ge=1, le=20, description="number of levels incl. level 0; default until one chunk"
    )


class Depth(_Model):
    """Output bit depth; 16-bit input is windowed to 8-bit unless kept."""

    output: Literal["uint8", "uint16"] = "uint8"
    window: tuple[float, float] | None = Field(
        None, description="input grey values mapped to 0..255 (16-bit input)"
    )
    percentiles: tuple[float, float] = Field(
        (0.1, 99.9), description="used when window is not given: estimated from sampled slices"
    )

    @field_validator("window")
    @classmethod
    def _window(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"window low ({v[0]}) must be below high ({v[1]})")
        return v

    @field_validator("percentiles")
    @classmethod
    def _pct(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return v


class Align(_Model):
    """Pairwise SIFT/RANSAC alignment and global solve (False in YAML = identity)."""

    enabled: bool = True
    downsample: int | None = Field(None, ge=1, description="feature copy factor; default ~1-2k px")
    nfeatures: int = Field(4000, ge=100)
    ratio: float = Field(0.75, gt=0, lt=1, description="Lowe ratio test; 0.9 for serial sections")
    coarse_fallback: bool = Field(
        True,
        description="retry pairs that fail on 4x coarser features (ratio 0.9): rescues "
        "serial-section TEM neighbours, ~6 % extra feature cost",
    )
    area: bool = Field(
        True,
        description="fit every pair by area-based matching (patch NCC, robust affine), from "
        "SIFT's estimate or a coarse search: what real serial sections need",
    )
    model: Literal["auto", "translation", "rigid", "affine"] = "auto"
    model_corner_threshold_px: float = Field(1.0, gt=0)
    method: Literal["global", "chain"] = "global"
    regularisation: float = Field(
        0.03,
        ge=0,
        description="drift control: pull on each slice (averaged over ±3 slices) toward rigid, "
        "relative to one neighbour link; 0 = none (README, alignment)",
    )
    detrend: Literal["rigid", "none"] = Field(
        "rigid",
        description="remove the slow turn and walk that pairwise matching accumulates along z "
        "(a linear trend of rotation and position, measured on each slice's non-fill "
        "footprint); 'none' keeps it, e.g. when the specimen truly turns (README, alignment)",
    )
    frame: Literal["slice", "union"] = Field(
        "slice",
        description="output frame: 'slice' = the slice size on the stack's mean content "
        "position (edges moved past it are cropped, reported); 'union' = cover every slice "
        "(grows with the content's wander) (README, alignment)",
    )
    bad_slices: Literal["bridge", "fill_previous", "zero", "error"] = "bridge"
    allow_segments: bool = Field(
        False,
        description="where no checked link crosses a gap, place the parts by their best "
        "unchecked estimate instead of stopping",
    )


class Enhance(_Model):
    """CLAHE after warping; clip_limit 0 disables it."""

    clip_limit: float = Field(0.02, ge=0, le=1, description="scikit-image sense; 0 disables CLAHE")
    kernel_size_px: int = Field(1024, ge=8)


#: run-folder intermediates a completed run may keep (``run.keep``); removed otherwise
KEEPABLE = ("features", "slice_cache", "handoff", "rendered")


class Run(_Model):
    """Execution resources (overridable with CLI flags) and what the run folder keeps."""

    workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    memory_per_worker: str | None = Field(None, description="e.g. '4GiB'")
    slab_depth: int | None = Field(
        None, ge=1, description="slices per slab; default from chunk depth and memory"
    )
    retries: int = Field(2, ge=0)
    cache_decoded: bool = Field(
        True,
        description="alignment: keep decoded slices as zstd-1 in the run folder so the render pass "
        "does not decode the source again (needs about the stack's size in scratch space)",
    )
    keep: tuple[Literal["features", "slice_cache", "handoff", "rendered"], ...] = Field(
        (),
        description="intermediates the run folder keeps after a complete run (default: none; "
        "e.g. [features] keeps the SIFT features)",
    )

    @field_validator("memory_per_worker")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None:
            parse_memory(v)
        return v

    @field_validator("keep", mode="before")
    @classmethod
    def _keep_one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


#: recipe keys that would hold a credential: refused (keys stay in the environment or a profile)
_CREDENTIAL_KEY = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)


def _refuse_credentials(data: Any) -> Any:
    if isinstance(data, dict):
        for name in data:
            if _CREDENTIAL_KEY.search(str(name)):
                raise ValueError(
                    f"'{name}' would put a credential in the recipe, and emflow never "
                    "stores or prints one: give keys to each process through its environment "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS; "
                    "a Kubernetes Secret via pod.envFrom) or name a profile (storage.profile)"
                )
    return data


class BucketStorage(_Model):
    """How to reach one bucket (overrides :class:`Storage`'s defaults); no credentials."""

    endpoint: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, Ceph)")
    region: str | None = None
    profile: str | None = Field(None, description="AWS profile name (~/.aws/credentials)")
    anonymous: bool = Field(False, description="unsigned requests (a public bucket)")

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data: Any) -> Any:
        return _refuse_credentials(data)

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v.strip()):
            raise ValueError(f"endpoint {v!r} is not an http(s):// URL (e.g. http://minio:9000)")
        if v is not None and "@" in v.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("endpoint must not hold user:password@; use a profile or the env")
        return v


class Storage(BucketStorage):
    """Object-store settings by reference only (endpoint, region, profile name, anonymous),
    with per-bucket overrides; each process finds its credentials in its own environment."""

    retries: int | None = Field(
        None, ge=1, description="attempts per request (default EMFLOW_STORE_RETRIES, else 6)"
    )
    buckets: dict[str, BucketStorage] = Field(
        default_factory=dict, description="per-bucket overrides, e.g. a public source bucket"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data: Any) -> Any:
        return _refuse_credentials(data)

    def settings(self) -> Any:
        """The :class:`emflow.io.storage.StorageSettings` of this process (its environment
        completes what the recipe leaves open)."""
        from emflow.io import storage

        return storage.resolve(
            endpoint=self.endpoint,
            region=self.region,
            profile=self.profile,
            anonymous=self.anonymous,
            buckets={b: s.model_dump() for b, s in self.buckets.items()},
            retries=self.retries,
        )


class Recipe(_Model):
    """A whole ingest: source slices → aligned, enhanced multiscale volumes."""

    source: Source
    voxel_size_nm: tuple[Annotated[float, Field(gt=0)], ...] = Field(
        ..., description="(x, y, z) in nanometres"
    )
    output_dir: str
    outputs: list[Output] = Field(..., min_length=1)
    pyramid: Pyramid = Pyramid()
    depth: Depth = Depth()
    align: Align = Align()  # on unless the recipe says ``align: false``
    enhance: Enhance = Enhance()
    run: Run = Run()
    storage: Storage | None = None  # object stores: by reference only, never a key
    base_dir: str = Field(".", exclude=True, description="directory relative paths resolve from")

    @field_validator("voxel_size_nm")
    @classmethod
    def _xyz(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) != 3:
            raise ValueError(f"give 3 values (x, y, z) in nm, got {len(v)}")
        return v

    @field_validator("align", mode="before")
    @classmethod
    def _align_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return {"enabled": v}
        return {} if v is None else v  # a bare ``align:`` means the defaults (on)

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [o.name for o in self.outputs]
        folded = [n.casefold() for n in names]  # case-insensitive file systems would merge them
        if len(set(folded)) != len(folded):
            raise ValueError(f"outputs need distinct 'name's, ignoring case (got {names})")
        return self

    # ---- derived ------------------------------------------------------------------
    def resolve(self, path: str) -> Path:
        """Resolve a recipe path against the recipe's directory (absolute paths unchanged)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output_dir)

    @property
    def output_remote(self) -> bool:
        """True when output_dir is an object-store URL (s3://, gs://)."""
        from emflow.io.location import is_url

        return is_url(self.output_dir)

    @property
    def output_root(self) -> Path | str:
        """Where outputs go: the resolved local folder, or the URL (no trailing '/')."""
        if self.output_remote:
            from emflow.io.location import Location

            return Location.of(self.output_dir).url
        return self.output_path

    @property
    def run_folder(self) -> Path:
        """The run folder the driver works in: ``output_dir/emflow-run``, or for a bucket
        output_dir a local copy on this machine (:func:`emflow.io.runmirror.local_dir_for`)
        whose ownership marker is kept in the bucket too."""
        if self.output_remote:
            from emflow.io.runmirror import local_dir_for

            return local_dir_for(f"{self.output_root}/{RUN_FOLDER}")
        return self.output_path / RUN_FOLDER

    def to_yaml(self) -> str:
        """The resolved recipe (all defaults filled in) as YAML."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False)

    def output_fingerprint(self) -> str:
        """Hash of every field that changes output bytes (not resources, not paths' spelling)."""
        data = self.model_dump(mode="json", exclude={"run", "storage"})
        data["run"] = {
            "slab_depth": self.run.slab_depth
        }  # resources and caches do not change bytes
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _loc(err: dict[str, Any]) -> str:
    """The YAML path of an error: ``outputs.0.encoding`` (union tags and validator names dropped)."""
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    return ".".join(p for p in parts if p not in _TAGS) or "recipe"


_TAGS = {"precomputed": PrecomputedOutput, "omezarr": OmeZarrOutput}


def _allowed_keys(loc: tuple) -> list[str] | None:
    """The keys the model at ``loc`` (minus the unknown key itself) accepts, or None."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in _TAGS:
            model = _TAGS[part]
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return None
        ann = info.annotation
        if part == "outputs":
            model = None  # resolved by the tag that follows
            continue
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
    if model is None:
        return None
    return [k for k, f in model.model_fields.items() if not f.exclude]


def recipe_from_dict(data: Any, *, base_dir: str | Path = ".", origin: str = "recipe") -> Recipe:
    """Validate a mapping into a :class:`Recipe`, raising :class:`RecipeError` naming the field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping of recipe fields at the top level")
    try:
        return Recipe.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = _loc(first)
        msg = first["msg"].removeprefix("Value error, ")
        missing = [_loc(e) for e in errors if e["type"] == "missing"]
        if first["type"] == "missing" and len(missing) > 1:
            others = exc.error_count() - len(missing)
            more = f" (and {others} more problem(s))" if others else ""
            raise RecipeError(
                f"{origin}: required fields are missing: {', '.join(missing)}{more}"
            ) from None
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(tuple(first["loc"]))
            msg = "unknown key (check the spelling" + (
                f"; allowed here: {', '.join(allowed)})" if allowed else ")"
            )
        elif first["type"] == "missing":
            msg = "required field is missing"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise RecipeError(f"{origin}: field '{loc}': {msg}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file; relative paths in it resolve from its directory."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe file {path} is a directory; give the recipe YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"recipe file {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    return recipe_from_dict(data, base_dir=path.parent.resolve(), origin=str(path))
