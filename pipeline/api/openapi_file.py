"""The committed OpenAPI document of the API (pipeline/api/openapi.json), for the default limits.

Regenerate after changing a route or a model: `.venv/bin/python -m pipeline.api.openapi_file`
(tests/unit/test_api_openapi.py fails while the committed file differs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.settings import Settings

OPENAPI_FILE = Path(__file__).with_name("openapi.json")


def current_document() -> dict[str, Any]:
    from pipeline.api.app import create_app, openapi_document

    return openapi_document(create_app(Settings.model_construct()))


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    OPENAPI_FILE.write_text(render(current_document()))
    print(f"wrote {OPENAPI_FILE}")


if __name__ == "__main__":
    main()
