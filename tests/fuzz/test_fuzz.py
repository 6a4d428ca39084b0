"""The graph fuzzer in CI: random models from the grammar under every recipe, checked by
the oracle (no crash; the float model's outputs; every float layer in the report with its
reason; close to float). Three derandomized examples per recipe in the fast tier, 12 in
the slow one (24 took 2.5 minutes of the full suite's CPU time on a 2-core Zen 3);
scripts/fuzz.sh runs thousands, and every failure it finds becomes a case in
test_regressions.py."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from tests.fuzz.grammar import RECIPE_OPTIONS, cases
from tests.fuzz.oracle import check_case

RECIPES = list(RECIPE_OPTIONS)


def _fuzz(recipe: str, examples: int) -> None:
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases(recipe))
    def prop(case):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each float layer warns once; the oracle checks
            check_case(case, recipe)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    try:
        prop()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fuzz(recipe):
    _fuzz(recipe, examples=3)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_fuzz_more(recipe):
    _fuzz(recipe, examples=12)
