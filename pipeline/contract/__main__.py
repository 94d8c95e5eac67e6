"""`python -m pipeline.contract [--write]`: print the JSON Schema generated from the field table,
or rewrite the published file with it (after a change to `pipeline/contract/fields.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.contract.schema import SCHEMA_RESOURCE, generate_schema, render_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the published file in the source tree")
    args = parser.parse_args()
    text = render_schema(generate_schema())
    if args.write:
        target = Path(__file__).resolve().parent.parent / SCHEMA_RESOURCE
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
