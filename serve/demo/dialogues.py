"""The demo model's training data: templated single-turn dialogues made from `serve/demo/data/facts.json`.

Every (question, answer) pair is generated in a fixed order from the facts (colours, animals, capitals,
arithmetic…); `demo_dialogues()` adds system-prompted variants so the model learns that a system message
matters. Nothing here depends on the build seed.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

Message = dict[str, str]
Dialogue = list[Message]

DATA_FILES = ("corpus.txt", "facts.json")
"""The shipped text the demo model is made from (under serve/demo/data/)."""


def data_text(name: str) -> str:
    return resources.files("serve.demo").joinpath("data", name).read_text(encoding="utf-8")


def data_digest() -> str:
    """sha256 of the shipped data files: written beside the model, it says which data built it."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        digest.update(data_text(name).encode("utf-8"))
    return digest.hexdigest()


def facts() -> dict:
    return json.loads(data_text("facts.json"))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def qa_pairs(facts: dict) -> list[tuple[str, str]]:
    """Every templated (question, answer) pair, in a fixed order."""
    pairs: list[tuple[str, str]] = []
    for thing, colour in facts["colours"]:
        pairs.append((f"What colour is {thing}?", f"{_sentence(thing)} is {colour}."))
    words = facts["number_words"]
    for animal in facts["animals"]:
        who = _with_article(animal["name"])
        sound = f"{_sentence(who)} says {animal['sound']}." if animal["sound"] else f"{_sentence(who)} makes no sound."
        legs = (
            f"{_sentence(who)} has {words[animal['legs']]} legs."
            if animal["legs"]
            else f"{_sentence(who)} has no legs."
        )
        pairs.append((f"What sound does {who} make?", sound))
        pairs.append((f"How many legs does {who} have?", legs))
        pairs.append((f"Where does {who} live?", f"{_sentence(who)} lives {animal['home']}."))
    for city, country in facts["cities"]:
        pairs.append((f"Which country is {city} in?", f"{city} is in {country}."))
    for country, capital in facts["capitals"]:
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for word, opposite in facts["opposites"]:
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for cycle, noun in ((facts["days"], "day"), (facts["months"], "month")):
        for i, name in enumerate(cycle):
            after = cycle[(i + 1) % len(cycle)]
            pairs.append((f"What {noun} comes after {name}?", f"{after} comes after {name}."))
    for a in range(1, 6):
        for b in range(1, 6):
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for a in range(2, 5):
        for b in range(2, 5):
            pairs.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    pairs.extend((question, answer) for question, answer in facts["chat"])
    return pairs


def _styled(style: str, answer: str) -> str:
    if style == "pirate":
        return f"Arr, matey! {answer}"
    if style == "shout":
        return answer.upper()
    return answer


def demo_dialogues() -> list[Dialogue]:
    """The supervised set: every templated pair, plus every fourth pair again under a system prompt.

    System prompts change the answer's style (pirate, shouting) or leave it alone (plain), so the
    model learns that a system message matters. Independent of the build seed.
    """
    known = facts()
    pairs = qa_pairs(known)
    dialogues: list[Dialogue] = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}] for question, answer in pairs
    ]
    styles = sorted(known["systems"])
    for i, (question, answer) in enumerate(pairs[::4]):
        style = styles[i % len(styles)]
        prompts = known["systems"][style]
        system = prompts[(i // len(styles)) % len(prompts)]
        dialogues.append(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
                {"role": "assistant", "content": _styled(style, answer)},
            ]
        )
    # Operators put long instruction prompts in front of every conversation (policies' `instructions`
    # rules); the model must answer as usual under them rather than drift into a trained style.
    instructions = known["instructions"]
    for i, (question, answer) in enumerate(pairs[1::3]):
        dialogues.append(
            [
                {"role": "system", "content": instructions[i % len(instructions)]},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        )
    return dialogues
