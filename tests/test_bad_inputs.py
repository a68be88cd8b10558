"""Every bad input of tests/bad_inputs.py is refused before any work, with its message, and creates
no output directory; README.md's table of them is the one those runs generate."""

import pytest

from tests.bad_inputs import CASES, README, comparable, make_files, readme_table, refusal, table


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each case's refusal message, or the AssertionError that says how it went wrong."""
    d = tmp_path_factory.mktemp("bad-inputs")
    make_files(str(d))
    results = []
    for case in CASES:
        try:
            results.append(refusal(case, str(d)))
        except AssertionError as e:
            results.append(e)
    return results


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(c.args) for c in CASES])
def test_bad_input_is_refused(outcomes, index):
    if isinstance(outcomes[index], AssertionError):
        raise outcomes[index]


def test_readme_table_is_generated_from_the_cases(outcomes):
    if any(isinstance(o, AssertionError) for o in outcomes):
        pytest.fail("a case was not refused as expected (see test_bad_input_is_refused)")
    current = readme_table(open(README, encoding="utf-8").read())
    assert current is not None, "README.md lacks the bad-inputs section"
    assert comparable(current) == comparable(table(outcomes)), "run: python -m tests.bad_inputs"
