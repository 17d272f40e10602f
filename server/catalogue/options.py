"""What a catalogue build asks of `edgefleet optimize`, and the command line that says it.

Every field defaults to None, meaning "the optimizer's own default": a build's options are
exactly what someone chose, so they merge cleanly (the model's options from `models add`,
then the build's) and the stored JSON stays short. Only options that change the bundle's
content are here; where the bundle goes, its model id, version and key are the runner's.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# An exit tensor name goes on the optimizer's command line: no commas (its separator), no
# leading dash (an option), nothing a shell-less argv could still misread.
_TENSOR = r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,199}$"
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class BuildOptions(BaseModel):
    """Options of one build (None: the optimizer's default), checked as the optimizer would."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_drop: float | None = Field(None, ge=0, le=1, description="accepted accuracy drop")
    quantization: Literal["static", "dynamic", "fp16", "none"] | None = None
    calibration: Literal["minmax", "entropy", "percentile"] | None = None
    head_precision: Literal["float", "int8"] | None = None
    exits: Literal["auto", "none"] | list[str] | None = Field(
        None, description="auto, none, or the tensors to cut after"
    )
    prune: float | None = Field(None, ge=0, lt=1, description="fraction of conv channels")
    low_rank: float | None = Field(None, gt=0, le=1, description="SVD energy kept")
    share: int | None = Field(None, ge=2, le=256, description="k-means clusters per channel")
    threads: int | None = Field(None, ge=1, le=64, description="threads for latency figures")
    # Preprocessing, usually given once at `models add` and inherited by every build.
    size: str | None = Field(None, pattern=r"^[1-9][0-9]{0,4}(x[1-9][0-9]{0,4})?$")
    color: Literal["GRAY", "RGB", "BGR"] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    mean: list[float] | None = Field(None, min_length=1, max_length=4)
    std: list[float] | None = Field(None, min_length=1, max_length=4)
    scale: float | None = Field(None, gt=0)
    resize: Literal["stretch", "letterbox", "center_crop"] | None = None
    interpolation: Literal["nearest", "linear", "area", "cubic"] | None = None

    @field_validator("exits")
    @classmethod
    def _tensor_names(
        cls, value: Literal["auto", "none"] | list[str] | None
    ) -> Literal["auto", "none"] | list[str] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one tensor name, or 'auto' / 'none'")
            for name in value:
                if not re.fullmatch(_TENSOR, name):
                    raise ValueError(f"exit tensor name {name!r} is not a plain tensor name")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("std values must be positive")
        return value

    def chosen(self) -> dict[str, Any]:
        """The options someone set (None left out), as JSON values."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        """The stored form (sorted keys: equal options, equal text)."""
        return json.dumps(self.chosen(), sort_keys=True)

    def over(self, base: BuildOptions) -> BuildOptions:
        """These options on top of base: what this one sets wins, the rest is base's."""
        return BuildOptions.model_validate({**base.chosen(), **self.chosen()})


class ModelOptions(BuildOptions):
    """What `models add` keeps with a source model: defaults for its builds, and its model id
    (the manifest's model_id of every variant; the catalogue name when not given)."""

    model_id: str | None = Field(None, pattern=_ID)

    def build_defaults(self) -> BuildOptions:
        """The options its builds inherit."""
        return BuildOptions.model_validate(self.model_dump(exclude={"model_id"}))


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def optimize_args(options: BuildOptions) -> list[str]:
    """The `edgefleet optimize` options for these build options (--opt=value, one each).

    The `=` form keeps every value a value, whatever it starts with.
    """
    args: list[str] = []
    for name, value in options.chosen().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            text = ",".join(_number(v) if isinstance(v, float | int) else str(v) for v in value)
        elif isinstance(value, float):
            text = _number(value)
        else:
            text = str(value)
        args.append(f"{flag}={text}")
    return args
