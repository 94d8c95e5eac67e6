"""Fixtures of the deployment tests: every kustomize variant, rendered once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.support import KUBE, Manifest, hpa_variant, kustomize

# name -> kustomization directory (the HPA variant is built in a temporary directory).
_VARIANTS = {
    "base": KUBE / "base",
    "dev": KUBE / "overlays" / "dev",
    "prod": KUBE / "overlays" / "prod",
    "prod-hpa": None,
}
VARIANT_NAMES = list(_VARIANTS)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    out = {}
    for name, directory in _VARIANTS.items():
        path: Path = directory if directory is not None else hpa_variant(tmp_path_factory.mktemp("hpa"))
        out[name] = kustomize(path)
    return out
