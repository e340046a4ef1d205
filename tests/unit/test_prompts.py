"""Prompts and descriptions match the original service word for word (contract §4)."""

import pytest

from dynamo.domain import prompts
from dynamo.domain.jobs import Style

FRIEND_TAIL = (
    ", illustrated in the style of 1990s digital clip art images, with a limited 256-color"
    " palette and sharp black outlines, with a solid {} background suitable for chroma keying"
)


def test_colors_are_the_contracts_thirteen_in_order():
    assert prompts.COLORS == (
        "red", "red-orange", "orange", "yellow-orange", "yellow", "chartreuse", "green",
        "cyan", "sky-blue", "blue", "indigo", "purple", "magenta",
    )


def test_ghost_prompt():
    assert prompts.ghost_prompt("a seal") == (
        "a ghostly image of a seal, with glitchy VHS artifacts, dark background"
    )


def test_ghost_prompt_trims_the_subject():
    assert prompts.ghost_prompt("  a seal \n") == prompts.ghost_prompt("a seal")


@pytest.mark.parametrize(
    ("color", "subject", "start", "background"),
    [
        ("yellow", "caterpillar in a top hat", "a yellow caterpillar in a top hat", "indigo"),
        ("orange", "the owl", "an orange owl", "sky-blue"),
        ("indigo", "An egg", "an indigo egg", "yellow-orange"),
        ("red", "a frog", "a red frog", "green"),
        ("green", "an apple", "a green apple", "red"),
        ("sky-blue", "theatre mask", "a sky-blue theatre mask", "orange"),
    ],
)
def test_friend_prompt(color, subject, start, background):
    assert prompts.friend_prompt(color, subject) == start + FRIEND_TAIL.format(background)


@pytest.mark.parametrize(
    ("color", "complement"),
    [
        ("red", "green"), ("green", "red"), ("red-orange", "cyan"), ("orange", "sky-blue"),
        ("yellow-orange", "blue"), ("yellow", "indigo"), ("chartreuse", "magenta"),
        ("cyan", "red-orange"), ("sky-blue", "orange"), ("blue", "yellow-orange"),
        ("indigo", "yellow-orange"), ("purple", "yellow"), ("magenta", "chartreuse"),
    ],
)
def test_complements(color, complement):
    assert prompts.COMPLEMENTS[color] == complement
    assert prompts.friend_prompt(color, "owl").endswith(f"solid {complement} background suitable for chroma keying")


def test_every_color_has_a_complement_among_the_colors():
    assert set(prompts.COMPLEMENTS) == set(prompts.COLORS)
    assert set(prompts.COMPLEMENTS.values()) <= set(prompts.COLORS)


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("caterpillar in a top hat", "a caterpillar in a top hat"),
        ("the owl", "an owl"),
        ("An egg", "an egg"),
        ("a unicorn", "an unicorn"),  # by letter, as the original did
        ("  The   big dog ", "a big dog"),
        ("theatre mask", "a theatre mask"),  # "the" only as a word
        ("a", "an a"),  # a lone article is the subject itself
    ],
)
def test_friend_description(subject, expected):
    assert prompts.friend_description(subject) == expected


def test_description_by_style():
    assert prompts.description(Style.GHOST, {"subject": " a seal "}) == "a seal"
    friend = {"color": "yellow", "subject": "caterpillar in a top hat"}
    assert prompts.description(Style.FRIEND, friend) == "a caterpillar in a top hat"


def test_name_prompt_is_the_trimmed_subject_as_written():
    # As the original (handler.go formats the subject as is): no article added...
    assert prompts.name_prompt(" caterpillar in a top hat ") == (
        "Please come up with a name for a friendly mascot character who is caterpillar"
        " in a top hat. Please answer with a single name, and no additional text."
    )
    # ...and none taken away.
    assert prompts.name_prompt("the king of frogs").endswith(
        "character who is the king of frogs. Please answer with a single name, and no"
        " additional text."
    )


@pytest.mark.parametrize(
    ("answer", "name"),
    [
        ("Sir Hatsworth", "Sir Hatsworth"),
        ("  Sir Hatsworth.\n", "Sir Hatsworth"),
        ('"Sir Hatsworth"', "Sir Hatsworth"),
        ('"Sir Hatsworth".', "Sir Hatsworth"),
        ("\u201cSir Hatsworth.\u201d", "Sir Hatsworth"),
        ("'Bob'", "Bob"),
        ("O'Brien", "O'Brien"),
        ("Sir\n\tHats   worth", "Sir Hats worth"),
        ("", "Friend"),
        ('  "" . ', "Friend"),
        ("x" * 200, "x" * 60),
    ],
)
def test_clean_name(answer, name):
    assert prompts.clean_name(answer) == name


def test_clean_name_never_ends_in_a_space_after_cutting():
    name = prompts.clean_name("a" * 59 + " bcdef")
    assert name == "a" * 59
