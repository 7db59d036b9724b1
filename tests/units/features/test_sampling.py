import collections

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
