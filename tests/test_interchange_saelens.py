"""SAELens loads what drrik saves, checked by SAELens itself in its own environment.

sae-lens needs transformer-lens < 4, so it cannot share drrik's environment: this test runs
``benchmarks/interchange/saelens_check.py`` with the Python named by ``DRRIK_SAELENS_PYTHON``
(``.ci/run`` makes that environment), on the SAEs and skip transcoders that
``write_dictionaries.py`` writes here. Without that variable it is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drrik
from drrik.sae.registry import ARCHITECTURES

INTERCHANGE = Path(__file__).parent.parent / "benchmarks" / "interchange"
SAELENS_PYTHON = os.environ.get("DRRIK_SAELENS_PYTHON", "")
TOLERANCE = 1e-5  # relative to the largest output: float32 rounding, not a different function

pytestmark = pytest.mark.skipif(
    not SAELENS_PYTHON,
    reason="set DRRIK_SAELENS_PYTHON to a Python with sae-lens installed (.ci/run does)",
)


def test_saelens_loads_drrik_saes_and_transcoders(tmp_path: Path) -> None:
    out = tmp_path / "interchange"
    subprocess.run(
        [sys.executable, str(INTERCHANGE / "write_dictionaries.py"), str(out)],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [SAELENS_PYTHON, str(INTERCHANGE / "saelens_check.py"), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    results = json.loads(done.stdout)

    saes = results["saes"]
    assert set(saes) == set(ARCHITECTURES)
    for name, sae in saes.items():
        assert "error" not in sae, (name, sae)
        assert sae["active_mismatches"] == 0, name
        assert sae["feature_acts"]["max_rel"] < TOLERANCE, name
        assert sae["recon"]["max_rel"] < TOLERANCE, name

    transcoders = results["transcoders"]
    assert transcoders
    for name, result in transcoders.items():
        assert result.get("saelens_class") == "JumpReLUSkipTranscoder", (name, result)
        io = load_file(str(out / "io" / f"saelens-{name}.safetensors"))
        with torch.no_grad():
            ours = drrik.load_sae(out / "transcoders" / name)(io["x"])
        scale = io["out"].abs().max()
        assert ((ours - io["out"]).abs().max() / scale).item() < TOLERANCE, name
