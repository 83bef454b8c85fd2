"""`secondstage policy check|test`, through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from serve.policy.cli import policy_app
from tests.core.policy.conftest import write_rules

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]


def test_shipped_policies_pass_check() -> None:
    result = runner.invoke(policy_app, ["check", str(REPO / "policies")])
    assert result.exit_code == 0, result.output
    assert "examples pass" in result.output


def test_failing_example_exits_nonzero(tmp_path: Path) -> None:
    write_rules(
        tmp_path,
        """
        rules:
          - id: cards
            description: cards
            kind: preset
            preset: credit_card
            action: redact
            examples:
              match:
                - text: "4111 1111 1111 1111"
                  result: "[CREDIT CARD]"
                - "4111 1111 1111 1112"
              no_match: ["5500 0000 0000 0004"]
        """,
    )
    result = runner.invoke(policy_app, ["check", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 1
    out = result.output
    assert "3 example(s) failed" in out
    assert "expected result '[CREDIT CARD]', got '[CARD]'" in out
    assert "expected a match" in out and "expected no match" in out


def test_invalid_rule_file_exits_2(tmp_path: Path) -> None:
    write_rules(tmp_path, "rules:\n  - {id: r, description: d, kind: regex, pattern: 'x+', action: flag}\n")
    result = runner.invoke(policy_app, ["check", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 2
    assert "rule 'r'" in result.output and "max_len" in result.output


def test_test_command_shows_decisions_and_result() -> None:
    args = ["test", "mail jane@example.com now", "--stage", "output", "--dir", str(REPO / "policies")]
    result = runner.invoke(policy_app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pii.email" in result.output and "mail [EMAIL] now" in result.output

    args = ["test", "hi\u200b there", "--stage", "input", "--dir", str(REPO / "policies")]
    result = runner.invoke(policy_app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "behaviour.invisible-unicode" in result.output and "user: hi there" in result.output


def test_test_command_shows_what_the_client_receives_on_a_block(tmp_path: Path) -> None:
    write_rules(
        tmp_path,
        """
        rules:
          - id: stop
            description: stop
            kind: keywords
            keywords: [frobnicate]
            action: block
            refusal: "No."
            examples:
              match: [{text: "Sure. To frobnicate it", result: "No."}]  # an example's result is the rule's answer
        """,
    )
    result = runner.invoke(policy_app, ["check", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    args = ["test", "Sure. To frobnicate it", "--dir", str(tmp_path)]
    result = runner.invoke(policy_app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "blocked (finish_reason content_filter); refusal: No." in result.output
    assert "the client receives: 'Sure. To No.'" in result.output
