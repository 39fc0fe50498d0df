"""Secrets and settings chosen by the environment rather than by a run's config.

Tokens (W&B, Hugging Face) and machine-level W&B choices come from the environment or a
``.env`` file, never from ``config.yaml``: a config is saved with the run and shared, a token
must not be. The environment wins over ``.env`` so a cluster job can override a developer's
file. Secrets are masked in ``repr``/``str`` and this module never writes them to disk.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, fields
from pathlib import Path

from drrik.errors import ConfigError

MASK = "****"
SECRETS = ("wandb_api_key", "hf_token")
# Field -> environment names, the first one preferred; libraries read the first from os.environ.
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "wandb_api_key": ("WANDB_API_KEY",),
    "hf_token": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "wandb_mode": ("WANDB_MODE",),
    "wandb_project": ("WANDB_PROJECT",),
    "wandb_entity": ("WANDB_ENTITY",),
}


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file; ``#`` comments, quotes and ``export`` allowed.

    A missing file is an empty one. A malformed line is reported by number only, since its
    text may be a pasted token.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key.isidentifier():
            raise ConfigError(
                "env_file", str(path), f"line {number} is not KEY=VALUE; fix or comment it out"
            )
        quote = value[:1]
        end = value.find(quote, 1) if quote in ("'", '"') else -1
        values[key] = value[1:end] if end > 0 else value.split(" #", 1)[0].rstrip()
    return values


@dataclass(frozen=True, repr=False)
class EnvironmentSettings:
    """What the environment (or ``.env``) says; ``None`` where it says nothing."""

    wandb_api_key: str | None = None
    hf_token: str | None = None
    wandb_mode: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    env_file: Path | None = None
    """The ``.env`` file read, if any."""
    from_env_file: frozenset[str] = frozenset()
    """Fields whose value came from the ``.env`` file rather than the environment."""

    @classmethod
    def load(
        cls,
        env_file: str | Path | None = ".env",
        environ: MutableMapping[str, str] | None = None,
    ) -> EnvironmentSettings:
        """Read every setting from ``environ`` (default ``os.environ``), else from ``env_file``."""
        environ = os.environ if environ is None else environ
        file_values = read_env_file(env_file) if env_file is not None else {}
        values: dict[str, str] = {}
        from_file: set[str] = set()
        for name, env_names in ENV_NAMES.items():
            for source, is_file in ((environ, False), (file_values, True)):
                found = next((source[n] for n in env_names if source.get(n)), None)
                if found is not None:
                    values[name] = found
                    if is_file:
                        from_file.add(name)
                    break
        return cls(
            **values,
            env_file=Path(env_file) if env_file is not None else None,
            from_env_file=frozenset(from_file),
        )

    def export_secrets(self, environ: MutableMapping[str, str] | None = None) -> list[str]:
        """Copy secrets read from ``.env`` into ``environ`` (default ``os.environ``).

        wandb and huggingface_hub look for their tokens only in the environment, and neither
        reads ``.env``. Variables already set are left alone. Returns the names set.
        """
        environ = os.environ if environ is None else environ
        exported = []
        for name in SECRETS:
            value = getattr(self, name)
            env_name = ENV_NAMES[name][0]
            if value and name in self.from_env_file and env_name not in environ:
                environ[env_name] = value
                exported.append(env_name)
        return exported

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRETS and value is not None:
                value = MASK
            shown.append(f"{f.name}={value!r}")
        return f"EnvironmentSettings({', '.join(shown)})"


_cached: EnvironmentSettings | None = None


def get_settings(env_file: str | Path | None = ".env", reload: bool = False) -> EnvironmentSettings:
    """The process-wide settings, read once; ``reload`` or another ``env_file`` re-reads them."""
    global _cached
    wanted = Path(env_file) if env_file is not None else None
    if reload or _cached is None or _cached.env_file != wanted:
        _cached = EnvironmentSettings.load(env_file)
    return _cached
