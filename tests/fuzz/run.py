"""The long fuzz run: `python -m tests.fuzz.run --recipe w8a8 --examples 2000 [--seed 0]`.

Draws cases from the grammar (tests/fuzz/grammar.py) and checks each with the oracle
(tests/fuzz/oracle.py) until the recipe has seen the number of examples asked for. A new
failure is shrunk by hypothesis and printed as a `Case(...)` ready to paste into
tests/fuzz/test_regressions.py; the run then goes on with the next seed, counting further
cases that fail the same way (same signature: exception type, the qcompile frame it came
from, the message's first line without numbers) instead of shrinking them again. The last
line is a JSON summary: examples, failures by signature, refusals.

Reproducible: round r of a run draws with hypothesis seed `seed + r` (printed), and every
failure prints its case, which `check_case(case, recipe)` replays alone. No example
database: a rerun with the same seed replays the same cases, one with another seed resumes
with new ones. scripts/fuzz.sh runs several recipes in turn.
"""

from __future__ import annotations

import os

# as tests/conftest.py sets them for the suite: the stage verifier after every pass, the
# CPU integer path for kernels="auto"'s default, Triton in its interpreter without a GPU
os.environ.setdefault("QCOMPILE_VERIFY", "1")
os.environ.setdefault("QCOMPILE_KERNELS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.fuzz.grammar import RECIPE_OPTIONS, cases  # noqa: E402
from tests.fuzz.oracle import check_case  # noqa: E402

RECIPES = tuple(RECIPE_OPTIONS)
_OURS = ("/qcompile/", "/passes/", "/lowering/", "/tests/fuzz/")


def signature(exc: BaseException) -> str:
    """What tells one bug from another: the exception type, the innermost frame of ours it
    passed through, and the message's first line with numbers blanked."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if any(part in f.filename.replace(os.sep, "/") for part in _OURS)]
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else "?"
    first = (str(exc).strip().splitlines() or [""])[0]
    first = re.sub(r"(?<![\w.])\d+(\.\d+)?(?![\w.])", "N", first)[:100]  # not w8a8
    return f"{type(exc).__name__} @ {where}: {first}"


class Run:
    def __init__(self, recipe: str, examples: int, base_seed: int, out=sys.stdout):
        self.recipe, self.target, self.base_seed, self.out = recipe, examples, base_seed, out
        self.examples = 0  # cases drawn and checked (shrinking's replays not counted)
        self.shrink_calls = 0
        self.refused: Counter[str] = Counter()
        self.failures: dict[str, dict] = {}  # signature -> {"count", "case", "seed"}
        self.cosines: list[float] = []
        self.t0 = time.perf_counter()

    def log(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def one_round(self, round_seed: int) -> bool:
        """Draws until the target or a new failure; True when a new failure was found."""
        shrinking = False
        last: list = [None]

        @seed(round_seed)
        @settings(max_examples=self.target - self.examples, deadline=None, database=None,
                  derandomize=False, phases=(Phase.generate, Phase.shrink),
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                  print_blob=False)
        @given(cases(self.recipe))
        def prop(case):
            nonlocal shrinking
            if shrinking:
                self.shrink_calls += 1
            else:
                self.examples += 1
                if self.examples % 50 == 0:
                    self.progress()
            try:
                result = check_case(case, self.recipe)
            except Exception as exc:
                sig = signature(exc)
                if sig in self.failures:  # a known bug: counted, not shrunk again
                    if not shrinking:
                        self.failures[sig]["count"] += 1
                    return
                shrinking = True
                last[0] = (case, exc, sig)
                raise
            if result["refused"] is not None:
                sig = signature(result["refused"])
                if sig not in self.refused:
                    self.log(f"refused (an accepted error): {sig}\n  {case!r}")
                self.refused[sig] += 1
            elif result["cosine"] is not None:
                self.cosines.append(result["cosine"])

        try:
            prop()
        except Exception as outer:
            if last[0] is None:
                self.log(f"hypothesis stopped without a failing case: {outer!r}")
                return False
            case, exc, sig = last[0]  # the last failing call is the shrunk example
            self.failures[sig] = {"count": 1, "case": repr(case), "seed": round_seed}
            exc.__notes__ = []  # hypothesis' own print of the case, repeated below
            tb = "".join(traceback.format_tb(exc.__traceback__)[-6:])
            tb += f"{type(exc).__name__}: {exc}"
            self.log(f"\n=== new failure ({self.recipe}, seed {round_seed}): {sig}\n"
                     f"shrunk case (check_case(case, {self.recipe!r})):\n{case!r}\n{tb}")
            return True
        return False

    def progress(self) -> None:
        fails = sum(f["count"] for f in self.failures.values())
        self.log(f"[{self.recipe}] {self.examples}/{self.target} examples, {fails} failing "
                 f"({len(self.failures)} distinct), {sum(self.refused.values())} refused, "
                 f"{time.perf_counter() - self.t0:.0f} s")

    def run(self) -> dict:
        self.log(f"fuzzing {self.recipe}: {self.target} examples, seeds {self.base_seed}, "
                 f"{self.base_seed + 1}, ... (one per round; a round ends at a new failure)")
        r = 0
        while self.examples < self.target:
            found = self.one_round(self.base_seed + r)
            r += 1
            if not found and self.examples < self.target:
                self.log("hypothesis ran out of new cases")
                break
        return self.summary()

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        cos = sorted(self.cosines)
        return {
            "recipe": self.recipe, "examples": self.examples,
            "shrink_calls": self.shrink_calls, "seconds": round(elapsed),
            "seconds_per_call": round(elapsed / max(1, self.examples + self.shrink_calls), 2),
            "failing_examples": sum(f["count"] for f in self.failures.values()),
            "failures": self.failures, "refused": dict(self.refused),
            "min_cosine": round(cos[0], 5) if cos else None,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", choices=RECIPES,
                        help="a recipe to fuzz (repeatable; default: all, in turn)")
    parser.add_argument("--examples", type=int, default=200, help="examples per recipe")
    parser.add_argument("--seed", type=int, default=0, help="the first round's seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    summaries = []
    for recipe in args.recipe or RECIPES:
        summary = Run(recipe, args.examples, args.seed).run()
        print("SUMMARY " + json.dumps(summary), flush=True)
        summaries.append(summary)
    return 1 if any(s["failures"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
