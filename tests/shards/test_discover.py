import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from shards import keys, synthetic
from shards.discover import detect_layout, discover
from tests.conftest import tone


def test_librispeech_tree_is_detected_and_keyed_by_utterance_id_with_transcripts(tmp_path):
    made = synthetic.write_librispeech(str(tmp_path), speakers=2, chapters=1, utterances=2)
    found = discover(str(tmp_path))
    assert found.layout == "librispeech"
    assert sorted(s.key for s in found.sources) == sorted(made)
    first = next(s for s in found.sources if s.key == made[0])
    speaker, chapter, _ = made[0].split("-")
    assert (first.speaker, first.group) == (speaker, chapter)
    assert first.text == f"WORDS OF UTTERANCE 0 BY SPEAKER {speaker}"


def test_librilight_tree_is_detected_with_sidecars_and_speaker_book_stem_keys(tmp_path):
    paths = synthetic.write_librilight(str(tmp_path), speakers=1, books=1, files=2, seconds=(2, 3))
    found = discover(str(tmp_path))
    assert found.layout == "librilight"
    assert [s.key for s in found.sources] == [
        "200_book_0_librivox_chapter_00_reader_64kb",
        "200_book_0_librivox_chapter_01_reader_64kb",
    ]
    assert all(s.sidecar and s.sidecar.endswith(".json") for s in found.sources)
    assert found.sources[0].path == paths[0]
    assert (found.sources[0].speaker, found.sources[0].group) == ("200", "book_0_librivox")


def test_any_tree_takes_audio_by_extension_recursively_and_ignores_the_rest(tmp_path):
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "x.wav", tone(0.1, 16000), 16000)
    (tmp_path / "b" / "c").mkdir(parents=True)
    sf.write(
        tmp_path / "b" / "c" / "y.OGG", tone(0.1, 16000), 16000, format="OGG", subtype="VORBIS"
    )
    (tmp_path / "notes.txt").write_text("not audio")
    found = discover(str(tmp_path))
    assert found.layout == "dir"
    assert [(s.key, s.group) for s in found.sources] == [("a_x", "a"), ("b_c_y", "b/c")]
    only_wav = discover(str(tmp_path), extensions=("wav",))
    assert [s.key for s in only_wav.sources] == ["a_x"]


def test_fairseq_tsv_list_resolves_paths_against_its_root_line_and_rejects_bad_lines(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "u1.flac", tone(0.2, 16000), 16000)
    sf.write(audio / "u2.flac", tone(0.2, 16000), 16000)
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{audio}\nu1.flac\t3200\nthis line is broken\nu2.flac\t3200\n")
    found = discover(str(tsv))
    assert found.layout == "list"
    assert [s.path for s in found.sources] == [str(audio / "u1.flac"), str(audio / "u2.flac")]
    assert [(r["source"], r["reason"]) for r in found.rejects] == [(f"{tsv}:3", "bad_list_entry")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_tabular_lists_take_path_and_optional_key_speaker_text(tmp_path, fmt):
    sf.write(tmp_path / "one.wav", tone(0.2, 16000), 16000)
    rows = [
        {"path": "one.wav", "key": "utt.1", "speaker": "s1", "text": "hello"},
        {"path": str(tmp_path / "one.wav"), "key": None, "speaker": None, "text": None},
    ]
    lst = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        lst.write_text(
            "path,key,speaker,text\none.wav,utt.1,s1,hello\n" + f"{tmp_path / 'one.wav'},,,\n"
        )
    elif fmt == "jsonl":
        lst.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), lst)
    found = discover(str(lst))
    assert found.sources[0].key == "utt_1"  # Dots never reach a key.
    assert (found.sources[0].speaker, found.sources[0].text) == ("s1", "hello")
    assert found.sources[0].path == str(tmp_path / "one.wav")
    assert found.sources[1].key == "one"


def test_a_list_without_a_path_column_is_a_clear_error(tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text("file,speaker\na.wav,1\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        discover(str(lst))


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        discover(str(tmp_path), layout="timit")


def test_detect_layout_of_a_plain_file_that_is_not_a_list(tmp_path):
    f = tmp_path / "a.wav"
    f.write_bytes(b"RIFF")
    with pytest.raises(ValueError, match="neither a directory nor a list"):
        detect_layout(str(f))


def test_broken_symlinks_are_discovered_so_they_can_be_rejected(tmp_path):
    os.symlink(tmp_path / "gone.flac", tmp_path / "link.flac")
    assert [s.key for s in discover(str(tmp_path)).sources] == ["link"]


def test_file_names_that_are_not_utf8_are_rejected_not_crashed_on(tmp_path):
    sf.write(tmp_path / "fine.wav", tone(0.1, 16000), 16000)
    bad = os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav")  # Latin-1 bytes.
    sf.write(tmp_path / "tmp.wav", tone(0.1, 16000), 16000)
    os.rename(os.path.join(os.fsencode(tmp_path), b"tmp.wav"), bad)
    found = discover(str(tmp_path))
    assert [s.key for s in found.sources] == ["fine"]
    assert [(r["reason"], r["source"].endswith("caf\ufffd.wav")) for r in found.rejects] == [
        ("bad_name", True)
    ]


def test_list_keys_are_sanitized_alike_whether_plain_or_odd(tmp_path):
    given = ["plain-key_1", "_edge_", "with.dot", "ünï côdé", "a/b", "", None, "x" * 3]
    lst = tmp_path / "list.parquet"
    paths = [f"d/{i}.flac" for i in range(len(given))]
    pq.write_table(pa.table({"path": paths, "key": given}), lst)
    found = discover(str(lst))
    expected = [keys.sanitize(k) if k else f"d_{i}" for i, k in enumerate(given)]
    assert found.table.column("key").to_pylist() == expected


def test_keys_from_paths_match_the_parts_rule_for_plain_and_odd_paths(tmp_path):
    rels = ["spk/book/utt1.flac", "spk/book/utt.v2.flac", "a b/c (1).wav", "_x_/y.flac"]
    lst = tmp_path / "list.csv"
    lst.write_text("path,speaker\n" + "".join(f"{r},7\n" for r in rels) + "/abs/dir/z.flac,\n")
    found = discover(str(lst))
    assert found.table.column("key").to_pylist() == [
        "spk_book_utt1",
        "spk_book_utt_v2",
        "a_b_c_1",
        "x_y",
        "z",  # Outside the list's folder: its file name.
    ]
    assert found.table.column("speaker").to_pylist() == ["7"] * 4 + [None]  # As str(7).
    assert found.table.column("path").to_pylist()[0] == str(tmp_path / rels[0])


def test_listed_files_find_their_sidecars_with_one_listing_per_folder(tmp_path, monkeypatch):
    from shards.core import storage

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            sf.write(tmp_path / folder / f"u{i}.flac", tone(0.1, 16000), 16000)
        (tmp_path / folder / "u1.json").write_text("{}")
    lst = tmp_path / "list.csv"
    lst.write_text("path\n" + "".join(f"{f}/u{i}.flac\n" for f in "ab" for i in range(3)))
    listed = []
    real_listdir = storage.listdir
    monkeypatch.setattr(storage, "listdir", lambda p: listed.append(p) or real_listdir(p))
    monkeypatch.setattr(storage, "exists", lambda p: pytest.fail(f"per-file check of {p}"))
    found = discover(str(lst))
    assert sorted(listed) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert found.table.column("sidecar").to_pylist() == [
        None, str(tmp_path / "a" / "u1.json"), None, None, str(tmp_path / "b" / "u1.json"), None
    ]  # fmt: skip
