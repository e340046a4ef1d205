"""The blocked terms list (dynamo/safety/blocked_terms.py): matching whole words and phrases
whatever the case and accents, reading the file again when it changes, keeping the last
good list when a change cannot be read, and refusing to start without a readable file."""

from __future__ import annotations

import os

import pytest

from dynamo import config
from dynamo.safety import blocked_terms
from dynamo.safety.blocked_terms import BlockedTerms, parse

TERMS = "# words the stream must never show\ncunt\nbad thing\n\nCRÈME brûlée\n  spaced  \n"


@pytest.mark.parametrize(
    ("subject", "line"),
    [
        ("a cunt", 2),
        ("A CUNT in a hat", 2),
        ("cunt!", 2),
        ("a bad thing", 3),
        ("a BAD   Thing, yes", 3),
        ("bad-thing", 3),  # punctuation separates words, as a space does
        ("creme brulee", 5),  # accents ignored in the subject...
        ("Crème Brûlée on a plate", 5),
        ("ＣＲＥＭＥ ＢＲＵＬＥＥ", 5),  # full-width letters are letters (NFKD)
        ("spaced", 6),
    ],
)
def test_a_listed_term_or_phrase_is_found_whatever_its_case_accents_and_spacing(subject, line):
    assert parse(TERMS).match(subject) == line


@pytest.mark.parametrize(
    "subject",
    [
        "Scunthorpe",  # a four-letter term inside a word is not that word
        "a cunty",
        "a bad",
        "thing bad",  # a phrase is its words in a row
        "a bad hat thing",
        "crème",
        "a seal",
        "",
    ],
)
def test_only_whole_words_and_whole_phrases_are_blocked(subject):
    assert parse(TERMS).match(subject) is None


def test_comments_blank_lines_and_punctuation_only_lines_block_nothing():
    terms = parse("# comment\n\n   \n---\n!!\n")
    assert terms.size == 0
    assert terms.match("# comment") is None


def test_the_file_is_read_again_when_it_changes_and_a_bad_change_keeps_the_last_good_list(
        tmp_path, caplog):
    path = tmp_path / "blocked.txt"
    path.write_text("alpha\n")
    terms = BlockedTerms(path)
    assert terms.match("an alpha") == 1 and terms.status_json()["terms"] == 1
    first_loaded = terms.status_json()["loaded_at"]

    path.write_text("beta\ngamma ray\n")
    os.utime(path, ns=(1, 1_000_000_000))  # a new mtime even within the clock's granularity
    assert terms.refresh() is True
    assert terms.match("an alpha") is None and terms.match("a gamma ray") == 2
    assert terms.status_json()["terms"] == 2

    path.write_bytes(b"delta\n\xff\xfe not utf-8\n")
    assert terms.refresh() is False
    assert terms.match("a gamma ray") == 2, "the last good list stays in force"
    assert "not UTF-8" in terms.status_json()["error"]
    assert any(r.levelname == "WARNING" and "keeping the last good list" in r.message
               for r in caplog.records)
    assert "delta" not in caplog.text and "gamma" not in caplog.text  # never the words

    path.unlink()
    assert terms.refresh() is False
    assert terms.match("a gamma ray") == 2

    path.write_text("epsilon\n")
    assert terms.refresh() is True
    assert terms.match("epsilon") == 1 and terms.status_json()["error"] is None
    assert terms.status_json()["loaded_at"] >= first_loaded


def test_the_status_shows_the_size_and_when_it_was_loaded_never_the_words(tmp_path):
    path = tmp_path / "blocked.txt"
    path.write_text("secretword\nanother one\n")
    status = BlockedTerms(path).status_json()
    assert status["configured"] is True and status["terms"] == 2 and status["loaded_at"]
    assert "secretword" not in repr(status) and "another" not in repr(status)
    assert BlockedTerms(None).status_json() == {
        "configured": False, "terms": 0, "loaded_at": None, "error": None}


def test_an_unreadable_file_at_startup_is_one_configuration_error(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(config.ConfigError) as caught:
        config.load({"DYNAMO_BLOCKED_TERMS_FILE": str(missing)})
    message = str(caught.value)
    assert "\n" not in message
    assert "DYNAMO_BLOCKED_TERMS_FILE" in message and str(missing) in message

    not_text = tmp_path / "binary.txt"
    not_text.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load({"DYNAMO_BLOCKED_TERMS_FILE": str(not_text)})

    good = tmp_path / "good.txt"
    good.write_text("x\n")
    assert config.load({"DYNAMO_BLOCKED_TERMS_FILE": str(good)}).blocked_terms_file == good


def test_an_approval_timeout_not_shorter_than_the_request_timeout_is_refused():
    env = {"DYNAMO_APPROVAL": "on", "DYNAMO_APPROVAL_TIMEOUT_S": "900",
           "DYNAMO_REQUEST_TIMEOUT_S": "900"}
    with pytest.raises(config.ConfigError, match="DYNAMO_APPROVAL_TIMEOUT_S") as caught:
        config.load(env)
    assert "\n" not in str(caught.value)
    settings = config.load({**env, "DYNAMO_APPROVAL_TIMEOUT_S": "899"})
    assert settings.approval and settings.approval_timeout_s == 899
    assert settings.approval_timeout_action == "reject"
    # Approval off: the timeout does not matter.
    assert not config.load({**env, "DYNAMO_APPROVAL": "off"}).approval
    with pytest.raises(config.ConfigError, match="DYNAMO_APPROVAL_TIMEOUT_ACTION"):
        config.load({"DYNAMO_APPROVAL_TIMEOUT_ACTION": "maybe"})


def test_words_are_normalized_without_accents_case_or_punctuation():
    assert blocked_terms.words_of("Ça  Va? «Déjà-vu»_ok") == ("ca", "va", "deja", "vu", "ok")
