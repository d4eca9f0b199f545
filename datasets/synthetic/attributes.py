"""Synthetic pedestrians: the attribute vocabulary, identity sampling and caption templates.

An identity is one fixed combination of attribute values. Values are dealt out evenly, so each single
value (a red jacket, a backpack, blonde hair) is worn by many identities: only the combination singles
a person out, in the image and in the text alike.
"""
from __future__ import annotations

import random
from collections import Counter

# name -> RGB; picked to stay apart at 32x32 under the generator's lighting changes.
COLOURS = {
    "black": (28, 28, 32), "white": (232, 232, 226), "grey": (128, 128, 132), "red": (196, 32, 36),
    "blue": (38, 72, 186), "green": (42, 136, 62), "yellow": (226, 198, 44), "pink": (232, 132, 176),
    "brown": (118, 74, 40), "purple": (118, 52, 150),
}
HAIR_COLOURS = {"black": (22, 20, 20), "brown": (96, 60, 32), "blonde": (214, 184, 110), "grey": (170, 170, 170)}
COLOUR_WORDS = {
    "grey": ["grey", "gray"], "purple": ["purple", "violet"], "pink": ["pink"], "black": ["black", "dark"],
    "white": ["white"], "red": ["red"], "blue": ["blue"], "green": ["green"], "yellow": ["yellow"],
    "brown": ["brown"], "blonde": ["blonde", "blond", "fair"],
}

# Each attribute: the values dealt to identities (repeats weight a value) and, for colours, the palette.
ATTRIBUTES = {
    "gender": ["woman", "man"],
    "hair": list(HAIR_COLOURS),
    "upper_type": ["jacket", "t-shirt", "sweater", "coat"],
    "upper_colour": list(COLOURS),
    "lower_type": ["trousers", "trousers", "shorts", "skirt"],
    "lower_colour": ["black", "white", "grey", "blue", "brown", "red", "green"],
    "shoes": ["black", "white", "brown", "red"],
    "bag": ["none", "backpack", "handbag", "shoulder bag"],
    "hat": ["none", "none", "cap", "beanie"],
}
# Colours of optional items; only identities that have the item get one.
OPTIONAL_COLOURS = {
    "bag_colour": ("bag", ["black", "brown", "red", "blue", "white", "yellow"]),
    "hat_colour": ("hat", ["black", "white", "red", "blue", "yellow"]),
}
ATTRIBUTE_NAMES = (*ATTRIBUTES, *OPTIONAL_COLOURS)


def identity_key(attrs: dict) -> tuple:
    """The attribute combination that defines an identity."""
    return tuple(attrs.get(name) for name in ATTRIBUTE_NAMES)


def _deal(values: list, n: int, rng: random.Random) -> list:
    """`n` values, each of `values` used equally often (up to one), in random order."""
    dealt = [values[i % len(values)] for i in range(n)]
    rng.shuffle(dealt)
    return dealt


def sample_identities(n: int, rng: random.Random) -> list[dict]:
    """Draw `n` identities with pairwise distinct attribute combinations and evenly shared values."""
    columns = {name: _deal(values, n, rng) for name, values in ATTRIBUTES.items()}
    people = [{name: columns[name][i] for name in ATTRIBUTES} for i in range(n)]
    for colour_name, (item, palette) in OPTIONAL_COLOURS.items():
        owners = [p for p in people if p[item] != "none"]
        for person, colour in zip(owners, _deal(palette, len(owners), rng)):
            person[colour_name] = colour
    # Swapping one value between two people keeps every value's count; repeat until combinations differ.
    swappable = list(ATTRIBUTES)
    for _ in range(100 * n + 100):
        counts = Counter(identity_key(p) for p in people)
        clash = next((i for i, p in enumerate(people) if counts[identity_key(p)] > 1), None)
        if clash is None:
            return people
        other, name = rng.randrange(n), rng.choice(swappable[1:])  # gender swap would orphan hair/skirt style only
        a, b = people[clash], people[other]
        if (name in ("bag", "hat")) and (a[name] == "none") != (b[name] == "none"):
            continue  # would leave a colour on a person without the item
        a[name], b[name] = b[name], a[name]
    raise ValueError(f"cannot draw {n} distinct identities from this vocabulary; use fewer ids")


# ---- captions -------------------------------------------------------------------------------------------

NOUNS = {
    "woman": ["woman", "lady", "girl", "young woman", "female pedestrian"],
    "man": ["man", "guy", "young man", "gentleman", "male pedestrian"],
    "neutral": ["person", "pedestrian"],
}
PRONOUNS = {"woman": "she", "man": "he"}
GARMENTS = {
    "jacket": ["jacket", "zip-up jacket"], "t-shirt": ["t-shirt", "tee", "short-sleeved shirt"],
    "sweater": ["sweater", "jumper", "pullover"], "coat": ["coat", "long coat", "overcoat"],
    "trousers": ["trousers", "pants", "long pants"], "shorts": ["shorts", "short pants"], "skirt": ["skirt"],
    "backpack": ["backpack", "rucksack"], "handbag": ["handbag", "purse"],
    "shoulder bag": ["shoulder bag", "messenger bag"], "cap": ["cap", "baseball cap"],
    "beanie": ["beanie", "knitted hat", "woolly hat"], "shoes": ["shoes", "sneakers", "footwear"],
}


def _colour(rng: random.Random, name: str) -> str:
    """A synonym of colour `name`."""
    return rng.choice(COLOUR_WORDS.get(name, [name]))


def _article(word: str) -> str:
    """'a' or 'an' before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def _phrases(attrs: dict, rng: random.Random) -> tuple[list[str], list[tuple[str, str]]]:
    """Worn items and extras (participle, sentence) this caption mentions; some are left out, as annotators do."""
    pron = PRONOUNS[attrs["gender"]]
    upper = f"{_colour(rng, attrs['upper_colour'])} {rng.choice(GARMENTS[attrs['upper_type']])}"
    lower = f"{_colour(rng, attrs['lower_colour'])} {rng.choice(GARMENTS[attrs['lower_type']])}"
    worn = [f"{_article(upper)} {upper}", f"{_article(lower)} {lower}" if attrs["lower_type"] == "skirt" else lower]
    if rng.random() < 0.5:
        worn.append(f"{_colour(rng, attrs['shoes'])} {rng.choice(GARMENTS['shoes'])}")
    if attrs["hat"] != "none" and rng.random() < 0.85:
        hat = f"{_colour(rng, attrs['hat_colour'])} {rng.choice(GARMENTS[attrs['hat']])}"
        worn.append(f"{_article(hat)} {hat}")
    if rng.random() < 0.15:
        worn.reverse()
    extras = []
    if attrs["bag"] != "none" and rng.random() < 0.9:
        bag = f"{_colour(rng, attrs['bag_colour'])} {rng.choice(GARMENTS[attrs['bag']])}"
        bag = f"{_article(bag)} {bag}"
        extras.append(rng.choice([(f"carrying {bag}", f"{pron} carries {bag}"),
                                  (f"with {bag}", f"{pron} has {bag}"),
                                  (f"holding {bag}", f"{pron} is holding {bag}")]))
    elif attrs["bag"] == "none" and rng.random() < 0.15:
        extras.append(rng.choice([("carrying nothing", f"{pron} carries nothing"),
                                  ("without a bag", f"{pron} has no bag")]))
    if rng.random() < 0.6:
        length = "long " if attrs["gender"] == "woman" else rng.choice(["short ", ""])
        hair = f"{length}{_colour(rng, attrs['hair'])} hair"
        extras.append((f"with {hair}", f"{pron} has {hair}"))
    rng.shuffle(extras)
    return worn, extras


def _join(items: list[str]) -> str:
    """'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentences(extras: list[tuple[str, str]]) -> str:
    """Extras as separate sentences."""
    return "".join(f" {sentence[0].upper()}{sentence[1:]}." for _, sentence in extras)


def make_caption(attrs: dict, rng: random.Random) -> str:
    """One caption from a random template, synonyms and clause order, e.g. 'A woman in a red jacket ...'."""
    noun = rng.choice(NOUNS[attrs["gender"] if rng.random() < 0.8 else "neutral"])
    a_noun = f"{_article(noun)} {noun}"
    worn, extras = _phrases(attrs, rng)
    template = rng.randrange(4)
    if template == 0:  # one sentence of participles: "A woman in a red jacket and black trousers, carrying ..."
        verb = rng.choice(["wearing", "in", "dressed in"])
        text = f"{a_noun.capitalize()} {verb} {_join(worn)}" + "".join(f", {p}" for p, _ in extras) + "."
    elif template == 1:
        text = f"The {noun} is wearing {_join(worn)}." + _sentences(extras)
    elif template == 2:
        lead, rest = extras[:1], extras[1:]
        text = f"This {noun} wears {_join(worn)}" + "".join(f", {p}" for p, _ in lead) + "." + _sentences(rest)
    else:
        text = f"{a_noun.capitalize()} with {' and '.join(worn[:2])}."
        if len(worn) > 2:
            text += f" {PRONOUNS[attrs['gender']].capitalize()} also wears {_join(worn[2:])}."
        text += _sentences(extras)
    return text
