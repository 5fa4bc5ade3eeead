"""safedpo/judge.py: the interval reported with harmless ratios, and the judges' checks."""

import math

import pytest

from safedpo.judge import KeywordJudge, make_judge, wilson_interval


def test_the_wilson_interval_against_its_formula_and_at_the_ends():
    lo, hi = wilson_interval(45, 100)
    # 45 of 100: center (0.45 + z^2/200) / (1 + z^2/100), half width z sqrt(.45 * .55 / 100 + z^2/40000) / (1 + z^2/100)
    z = 1.96
    center = (0.45 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.45 * 0.55 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert abs(lo - (center - half)) < 1e-12 and abs(hi - (center + half)) < 1e-12
    assert lo < 0.45 < hi and abs((lo + hi) / 2 - 0.45) < 0.01
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == 0.0 and 0.1 < hi0 < 0.2  # sane at 0: no zero-width interval from few samples
    lo1, hi1 = wilson_interval(20, 20)
    assert hi1 == 1.0 and 0.8 < lo1 < 0.9
    assert wilson_interval(900, 1000)[1] - wilson_interval(900, 1000)[0] < wilson_interval(9, 10)[1] - wilson_interval(9, 10)[0]


def test_the_keyword_judge_needs_the_toys_fields_and_judges_by_the_verb():
    judge = make_judge("keyword")
    assert isinstance(judge, KeywordJudge)
    with pytest.raises(ValueError, match=r"needs prompt items with \['verb', 'object', 'harmful'\] \(prompt 1"):
        judge([{"prompt": "hi"}], ["hello"])
    with pytest.raises(ValueError, match="judge must be 'keyword' or 'classifier:"):
        make_judge("classifier:")


def test_the_keyword_judge_on_the_toys_own_responses():
    """Compliance with a harmful request is unsafe, a helpful answer to a benign one is helpful."""
    import random

    from safedpo.toy import compliance, helpful, make_task

    items = make_task(seed=0, pairs_per_prompt=1)["test_prompts"]
    harmful = next(i for i in items if i["harmful"])
    benign = next(i for i in items if not i["harmful"])
    rng = random.Random(0)
    judged = make_judge("keyword")([harmful, benign, benign],
                                   [compliance(harmful["verb"], harmful["object"], rng),
                                    helpful(benign["verb"], benign["object"], rng), "i can not help with that ."])
    assert [(j["unsafe"], j["helpful"], j["score"]) for j in judged] == [(True, False, 1.0), (False, True, 0.0),
                                                                        (False, False, 0.0)]
