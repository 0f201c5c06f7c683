"""A small Weights & Biases wrapper every stage uses: configs, metrics, artifacts.

Offline unless ``WANDB_API_KEY`` is set (runs land in ``<dir>/wandb/`` and can be synced later with
``wandb sync``); ``WANDB_MODE`` (``online``/``offline``/``disabled``) is honoured when set. ``wandb`` is
imported only when a run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

from sae.storage import display, is_uri

PROJECT_ENV = "PLURISTEER_WANDB_PROJECT"
DEFAULT_PROJECT = "pluristeer"


def wandb_mode() -> str:
    """``online`` with an API key, else ``offline``; ``WANDB_MODE`` wins when set."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """One W&B run for one stage: ``with Tracker("train", cfg.to_dict(), out_dir) as t: t.log({...})``."""

    def __init__(
        self,
        stage: str,
        config: dict[str, Any],
        directory: str | Path = ".",
        *,
        name: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
    ) -> None:
        self.stage = stage
        self.mode = mode or wandb_mode()
        self.directory = Path("runs") if is_uri(directory) else Path(directory)  # W&B writes local files
        self.run: Any = None
        if self.mode == "disabled":
            return
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get(PROJECT_ENV, DEFAULT_PROJECT),
            job_type=stage,
            name=name,
            tags=tags,
            config=config,
            dir=str(self.directory),
            mode=self.mode,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    @property
    def run_dir(self) -> Path | None:
        """The run's local directory (offline runs keep everything there), or None when disabled."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict[str, float | int], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def log_artifact(self, path: str | Path, *, name: str, type: str, metadata: dict[str, Any] | None = None) -> None:
        """Log a file or directory as a W&B artifact (e.g. an SAE dir, a VectorSet file). An object-store URI
        is recorded in the run's summary instead (``artifact/<name>``): W&B's S3 references need boto3."""
        if self.run is None:
            return
        if is_uri(path):
            self.summary({f"artifact/{name}": display(path)})
            return
        import wandb

        artifact = wandb.Artifact(name=name, type=type, metadata=metadata or {})
        path = Path(path)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
