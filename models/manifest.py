"""The model manifest: everything a consumer needs to serve a model, beside the model file.

Classes, thresholds, input size and normalization come from here, never from code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.exceptions import ModelError

MANIFEST_NAME = "manifest.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    model_id: str
    version: str
    classes: list[str]
    thresholds: dict[str, float]
    input_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    file: str
    sha256: str
    precision: str = "fp32"
    parent: str | None = None
    no_hashtag_classes: list[str] = field(default_factory=lambda: ["others"])
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ModelError(f"manifest classes must be unique and non-empty: {self.classes}")
        missing = set(self.classes) - set(self.thresholds)
        if missing:
            raise ModelError(f"manifest has no threshold for {sorted(missing)}")

    @property
    def name(self) -> str:
        return f"{self.model_id}:{self.version}"

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path, *, verify: bool = True) -> Manifest:
        """Read `folder/manifest.json`; with `verify`, check the model file's hash."""
        path = Path(folder) / MANIFEST_NAME
        try:
            manifest = cls(**json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise ModelError(f"no {MANIFEST_NAME} in {folder}") from exc
        except (TypeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not a valid manifest: {exc}") from exc
        if verify:
            model_path = manifest.model_path(folder)
            if not model_path.is_file():
                raise ModelError(f"{path} names {manifest.file}, which does not exist")
            actual = file_sha256(model_path)
            if actual != manifest.sha256:
                raise ModelError(
                    f"{model_path} does not match its manifest (sha256 {actual[:12]}… "
                    f"!= {manifest.sha256[:12]}…)"
                )
        return manifest

    def model_path(self, folder: Path) -> Path:
        return Path(folder) / self.file

    def hashtags(self, probabilities: dict[str, float]) -> list[str]:
        """Multi-label hashtags: every class over its threshold, best first, never `others`."""
        chosen = [
            name
            for name, p in sorted(probabilities.items(), key=lambda kv: -kv[1])
            if p >= self.thresholds[name] and name not in self.no_hashtag_classes
        ]
        return [f"#{name}" for name in chosen]
