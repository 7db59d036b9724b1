import pytest

from shards import keys


def test_sanitize_replaces_dots_spaces_and_punctuation_but_keeps_unicode_letters():
    assert keys.sanitize("my file.v2 (take 1)") == "my_file_v2_take_1"
    assert keys.sanitize("Straße über") == "Straße_über"
    assert keys.sanitize("103-1240-0000") == "103-1240-0000"


def test_from_parts_joins_libri_light_style():
    assert keys.from_parts("100", "sea_fairies.v1", "chapter 01") == "100_sea_fairies_v1_chapter_01"


def test_segment_keys_follow_cut_by_vad_naming():
    assert keys.segment_key("100_book_ch01", 7) == "100_book_ch01_0007"


@pytest.mark.parametrize("bad", ["", "a.b", "a/b", "..", "-rf", "a\x00b"])
def test_check_refuses_keys_that_would_break_webdataset_or_escape_the_tar(bad):
    with pytest.raises(ValueError):
        keys.check(bad)
