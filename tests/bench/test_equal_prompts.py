"""The serving benchmark gives every server the same prompt tokens: the instructions full secondstage adds."""

from __future__ import annotations

from pathlib import Path

from bench.harness import ROOT
from bench.load import chat_body
from bench.serving import instructions_message


def test_the_instructions_message_is_the_one_the_input_policy_adds() -> None:
    text = instructions_message(ROOT / "policies")
    assert text is not None and text.startswith("You are a helpful, honest assistant.")


def test_no_instructions_rule_means_no_system_message(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "version: 1\nrules:\n  - id: r.flag\n    description: d\n    kind: keywords\n    keywords: [x]\n"
        "    stages: [input]\n    action: flag\n"
    )
    assert instructions_message(tmp_path) is None


def test_the_system_message_goes_first() -> None:
    body = chat_body("demo", "hi", 4, True, system="Be brief.")
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat_body("demo", "hi", 4, True)["messages"] == [{"role": "user", "content": "hi"}]
