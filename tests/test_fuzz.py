"""Fuzzed input (hypothesis, derandomized): every input surface ends in the right result or a one-line error.

The properties are hiermem.bench.fuzz's (shared with `hiermem bench --suite fuzz`, which runs 20x the examples);
here each runs EXAMPLES[surface] examples, and the inputs tried per surface are printed at the end (-s).
"""

import pytest

from hiermem.bench import fuzz

pytestmark = pytest.mark.usefixtures("one_thread")  # prepare trains a tokenizer; see conftest.torch_threads


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print("\nfuzz inputs tried: " + ", ".join(f"{k} {v}" for k, v in fuzz.INPUTS.items())
          + f" (total {sum(fuzz.INPUTS.values())})")


@pytest.mark.parametrize("surface", sorted(fuzz.PROPERTIES))
def test_property(surface):
    tried = fuzz.run_property(surface)
    assert tried >= fuzz.EXAMPLES[surface] // 2  # hypothesis ran the examples (not all discarded)
