import collections
import math

import numpy as np
import pyarrow as pa
import pytest

from units.features.sampling import SampleError, SampleRequest, draw, priority


def _corpus(shards=4, speakers=3, per=25):
    rows = []
    for s in range(shards):
        for p in range(speakers):
            for u in range(per):
                rows.append(
                    {
                        "key": f"s{s}_p{p}_u{u}",
                        "shard": f"{s:06d}",
                        "speaker": f"p{p}",
                        "duration": 1.0 + (u % 7),
                    }
                )
    return rows


def test_percent_takes_that_share_of_every_shard_and_speaker():
    rows = _corpus()
    picked = draw(rows, SampleRequest(percent=20, seed=1))
    assert len(picked) == round(0.2 * len(rows))
    per_stratum = collections.Counter((r["shard"], r["speaker"]) for r in picked)
    assert set(per_stratum.values()) == {5}  # 20% of 25 in each of the 12 strata.


def test_hours_takes_about_that_much_audio_from_every_stratum():
    rows = _corpus()
    total = sum(r["duration"] for r in rows) / 3600
    picked = draw(rows, SampleRequest(hours=total / 4, seed=1))
    hours = sum(r["duration"] for r in picked) / 3600
    assert (
        total / 4 <= hours <= total / 4 + 12 * 7 / 3600
    )  # At most one utterance over per stratum.
    assert len({(r["shard"], r["speaker"]) for r in picked}) == 12


def test_the_sample_depends_on_seed_and_keys_only_not_on_row_order():
    rows = _corpus()
    a = {r["key"] for r in draw(rows, SampleRequest(percent=10, seed=3))}
    b = {r["key"] for r in draw(list(reversed(rows)), SampleRequest(percent=10, seed=3))}
    c = {r["key"] for r in draw(rows, SampleRequest(percent=10, seed=4))}
    assert a == b and a != c


def test_priority_is_uniform_enough():
    values = [priority(0, f"k{i}") for i in range(10_000)]
    assert 0.48 < sum(values) / len(values) < 0.52
    assert all(0 <= v < 1 for v in values)


@pytest.mark.parametrize(
    "request_, message",
    [
        (SampleRequest(), "exactly one"),
        (SampleRequest(percent=10, hours=1), "exactly one"),
        (SampleRequest(percent=0), "must be in"),
        (SampleRequest(percent=150), "must be in"),
        (SampleRequest(hours=1000), "more than the corpus holds"),
    ],
)
def test_impossible_requests_are_clear_errors(request_, message):
    with pytest.raises(SampleError, match=message):
        draw(_corpus(), request_)


def test_a_sample_that_rounds_to_nothing_is_an_error():
    with pytest.raises(SampleError, match="empty"):
        draw(_corpus(shards=1, speakers=1, per=3), SampleRequest(percent=1))


def _largest_remainder(shares: dict, total: int) -> dict:
    """Integer quotas that sum to ``total``, each within 1 of its share: the floors, plus
    one for the largest remainders, equal ones in the order of the strata's ``repr``."""
    floors = {s: math.floor(v) for s, v in shares.items()}
    left = total - sum(floors.values())
    by_remainder = sorted(shares, key=lambda s: (floors[s] - shares[s], repr(s)))
    for s in by_remainder[: max(0, left)]:
        floors[s] += 1
    return floors


def _draw_row_by_row(rows, request):
    """The sampling rule written plainly, a dict per row (how the stage drew it before it
    went columnar): the columnar draw must pick exactly these rows."""
    strata = collections.defaultdict(list)
    for row in rows:
        strata[(row["shard"], row.get("speaker"))].append(row)
    total_hours = float(np.cumsum([r["duration"] for r in rows])[-1]) / 3600
    fraction = request.percent / 100 if request.percent is not None else request.hours / total_hours
    chosen = set()
    if request.percent is not None:
        quotas = _largest_remainder(
            {s: len(v) * fraction for s, v in strata.items()}, round(len(rows) * fraction)
        )
        for stratum, members in strata.items():
            ranked = sorted(members, key=lambda r: priority(request.seed, r["key"]))
            chosen.update(r["key"] for r in ranked[: quotas[stratum]])
    else:
        for members in strata.values():
            want = float(np.cumsum([r["duration"] for r in members])[-1]) * fraction
            got = 0.0
            for r in sorted(members, key=lambda r: priority(request.seed, r["key"])):
                if got >= want - 1e-9:
                    break
                chosen.add(r["key"])
                got += r["duration"]
    return [r for r in rows if r["key"] in chosen]


@pytest.mark.parametrize(
    "request_",
    [SampleRequest(percent=7, seed=5), SampleRequest(percent=50), SampleRequest(hours=0.3, seed=2)],
)
def test_the_columnar_draw_picks_exactly_the_rows_of_the_row_by_row_rule(request_):
    rng = np.random.default_rng(0)
    rows = [
        {
            "key": f"u{i:05d}",
            "shard": f"{int(rng.integers(0, 9)):06d}",
            # Speakers missing on some rows: None is a stratum of its own.
            "speaker": None if i % 11 == 0 else f"p{int(rng.integers(0, 5))}",
            "duration": float(rng.uniform(0.5, 20.0)),
        }
        for i in range(3000)
    ]
    table = pa.Table.from_pylist(rows)
    assert draw(table, request_).to_pylist() == _draw_row_by_row(rows, request_)
    assert draw(rows, request_) == _draw_row_by_row(rows, request_)


@pytest.mark.parametrize("percent", [10, 35, 50])
def test_equal_remainders_go_to_strata_in_the_order_of_their_repr(percent):
    """Strata of equal size tie on their remainders: the rule gives the extra utterances in
    the order of repr((shard, speaker)), names with quotes, spaces and punctuation below
    the quote character, and no speaker, included."""
    speakers = [None, "p", "p!", "p 2", "o'k", 'say "hi"', "ünï", "p#", "P", "10", "9"]
    rows = [
        {"key": f"u{s}_{p}_{u}", "shard": f"{s:06d}", "speaker": name, "duration": 1.0}
        for s in (3, 1, 12, 2)
        for p, name in enumerate(speakers)
        for u in range(3)  # Every stratum has 3 utterances: every remainder is the same.
    ]
    request_ = SampleRequest(percent=percent, seed=1)
    assert draw(pa.Table.from_pylist(rows), request_).to_pylist() == _draw_row_by_row(
        rows, request_
    )
