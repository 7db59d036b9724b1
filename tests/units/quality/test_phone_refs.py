"""Reference phones from fairseq tsv, MFA TextGrids and CTM, one per 100 Hz frame."""

from __future__ import annotations

import hashlib

import pytest
from praatio import textgrid

from units.features.frames import MFCC
from units.quality.phone_refs import (
    ReferenceError,
    check_rate,
    fingerprint,
    frames_from_segments,
    read_ctm,
    read_phone_tsv,
    read_references,
    read_textgrid,
    read_textgrids,
)

TEXTGRID = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 0.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 0.5
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 0.5
            text = "hi"
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 0.5
        intervals: size = 3
        intervals [1]:
            xmin = 0
            xmax = 0.1
            text = ""
        intervals [2]:
            xmin = 0.1
            xmax = 0.3
            text = "HH"
        intervals [3]:
            xmin = 0.3
            xmax = 0.5
            text = "AY1"
"""


def test_frames_take_the_phone_at_each_window_centre():
    # Frame i's centre is i/100 + 0.0125 s: frames 0..8 lie before 0.1 s, 9..28 before 0.3 s.
    frames = frames_from_segments([("a", 0.0, 0.1), ("b", 0.1, 0.3), ("c", 0.3, 0.5)], 0.5)
    assert len(frames) == MFCC.frames(8000) == 48
    assert frames[:9] == ["a"] * 9 and frames[9:29] == ["b"] * 20 and frames[29:] == ["c"] * 19
    # A gap is silence.
    assert frames_from_segments([("a", 0.2, 0.5)], 0.5)[:10] == ["sil"] * 10


def test_textgrid_and_ctm_of_the_same_alignment_agree(tmp_path):
    (tmp_path / "mfa" / "spk").mkdir(parents=True)
    (tmp_path / "mfa" / "spk" / "utt1.TextGrid").write_text(TEXTGRID)
    (tmp_path / "a.ctm").write_text(
        ";; comment\nutt1 1 0.000 0.100 sil\nutt1 1 0.100 0.200 HH\nutt1 1 0.300 0.200 AY1 0.9\n"
    )
    grid = read_references(str(tmp_path / "mfa"))
    ctm = read_ctm(str(tmp_path / "a.ctm"))
    assert grid == ctm == {"utt1": ["sil"] * 9 + ["HH"] * 20 + ["AY"] * 19}
    assert read_textgrids(str(tmp_path / "mfa"))["utt1"][-1] == "AY"  # Stress removed.


def test_phone_tsv_as_fairseq_writes_it(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("u1\tsil,AH0,AH1,T\nu2\tsil\n")
    assert read_phone_tsv(str(path)) == {"u1": ["sil", "AH", "AH", "T"], "u2": ["sil"]}
    assert read_phone_tsv(str(path), remove_stress=False)["u1"][1] == "AH0"


@pytest.mark.parametrize(
    "content, message",
    [
        ("u1\tsil,a\n\nu2\tb\n", r"bad.tsv, line 2: empty line"),
        ("u1 sil,a\n", r"bad.tsv, line 1: expected UTTID<TAB>"),
        ("u1\tsil,,a\n", r"line 1: an empty phone"),
        ("u1\ta\nu1\tb\n", r"line 2: utterance 'u1' appears twice"),
    ],
)
def test_malformed_tsv_lines_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.tsv").write_text(content)
    with pytest.raises(ReferenceError, match=message):
        read_phone_tsv(str(tmp_path / "bad.tsv"))


#: TEXTGRID's phones, one per 100 Hz frame: the empty first interval is silence.
FRAMES = ["sil"] * 9 + ["HH"] * 20 + ["AY"] * 19


def test_a_long_format_textgrid_gives_the_phones_tier_with_empty_intervals_as_silence(tmp_path):
    (tmp_path / "utt1.TextGrid").write_text(TEXTGRID)
    assert read_textgrid(str(tmp_path / "utt1.TextGrid")) == FRAMES
    stressed = read_textgrid(str(tmp_path / "utt1.TextGrid"), remove_stress=False)
    assert stressed[-1] == "AY1"
    # Another tier by name: the words tier has one interval over the whole utterance.
    assert set(read_textgrid(str(tmp_path / "utt1.TextGrid"), tier="words")) == {"hi"}


def test_a_short_format_textgrid_written_by_praatio_reads_the_same(tmp_path):
    (tmp_path / "long.TextGrid").write_text(TEXTGRID)
    grid = textgrid.openTextgrid(str(tmp_path / "long.TextGrid"), includeEmptyIntervals=True)
    grid.save(str(tmp_path / "short.TextGrid"), format="short_textgrid", includeBlankSpaces=True)
    written = (tmp_path / "short.TextGrid").read_text()
    assert "intervals [" not in written and '"IntervalTier"' in written  # The short format.
    assert read_textgrid(str(tmp_path / "short.TextGrid")) == FRAMES


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig"])
def test_textgrids_in_utf16_or_with_a_byte_order_mark_read_the_same(tmp_path, encoding):
    text = TEXTGRID.replace('"HH"', '"ʃ"')  # A phone outside ASCII, as IPA phone sets have.
    data = text.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # Praat writes the byte order mark first.
        data = ("\ufeff").encode(encoding) + data
    assert data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:3] == b"\xef\xbb\xbf"
    (tmp_path / "utt1.TextGrid").write_bytes(data)
    want = ["sil"] * 9 + ["ʃ"] * 20 + ["AY"] * 19
    assert read_references(str(tmp_path / "utt1.TextGrid")) == {"utt1": want}


@pytest.mark.parametrize(
    "content, message",
    [
        ("not a textgrid at all\n", "bad.TextGrid: not a TextGrid praatio can read"),
        (TEXTGRID.replace("xmax = 0.3", "xmax = soon"), "bad.TextGrid: not a TextGrid"),
        (TEXTGRID[: TEXTGRID.index("item [2]")], "bad.TextGrid: no interval tier named 'phones'"),
    ],
)
def test_a_malformed_textgrid_is_an_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "bad.TextGrid").write_text(content)
    with pytest.raises(ReferenceError, match=message):
        read_textgrid(str(tmp_path / "bad.TextGrid"))


def test_the_fingerprint_is_the_files_sha256_and_follows_a_directorys_content(tmp_path):
    (tmp_path / "p.tsv").write_text("u1\tsil,a\n")
    assert fingerprint(str(tmp_path / "p.tsv")) == hashlib.sha256(b"u1\tsil,a\n").hexdigest()
    (tmp_path / "mfa" / "spk").mkdir(parents=True)
    (tmp_path / "mfa" / "spk" / "utt1.TextGrid").write_text(TEXTGRID)
    before = fingerprint(str(tmp_path / "mfa"))
    (tmp_path / "mfa").rename(tmp_path / "moved")  # Moved: the same content.
    assert fingerprint(str(tmp_path / "moved")) == before
    (tmp_path / "moved" / "spk" / "utt1.TextGrid").rename(tmp_path / "moved" / "spk" / "u.TextGrid")
    assert fingerprint(str(tmp_path / "moved")) != before  # Renamed: another utterance id.
    with pytest.raises(OSError):
        fingerprint(str(tmp_path / "gone.tsv"))


def test_malformed_ctm_textgrid_and_unknown_files(tmp_path):
    (tmp_path / "bad.ctm").write_text("u1 1 0.0 0.1 a\nu1 1 zero 0.1 b\n")
    with pytest.raises(ReferenceError, match=r"bad.ctm, line 2: expected UTTID CHANNEL"):
        read_ctm(str(tmp_path / "bad.ctm"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.TextGrid").write_text(TEXTGRID.replace('"phones"', '"segments"'))
    with pytest.raises(ReferenceError, match="no interval tier named 'phones'"):
        read_references(str(tmp_path / "g"))
    with pytest.raises(ReferenceError, match="expected a .tsv, .ctm"):
        read_references(str(tmp_path / "bad.txt"))


def test_a_phone_file_at_another_rate_is_detected_from_lengths():
    durations = {"a": 2.0, "b": 3.0}
    at_100 = {"a": ["x"] * 198, "b": ["x"] * 298}
    assert check_rate(at_100, durations, "p.tsv") == pytest.approx(99.17, abs=0.1)
    at_50 = {"a": ["x"] * 99, "b": ["x"] * 149}
    with pytest.raises(ReferenceError, match=r"p.tsv: the references have 49.6 frames per second"):
        check_rate(at_50, durations, "p.tsv")
