"""Compiles a rule directory in a process of its own, for `RuleSetLoader.reload_off_loop`.

    python -m core.policy.worker POLICIES_DIR     # writes the pickled PolicySet (or PolicyError) to stdout

A reload compiled in a thread shares the server's GIL: on a busy machine the OS preempts that thread while it
holds the GIL, and the event loop (every stream) waits. In its own process the compile shares nothing; the set
comes back pickled (CompiledStage serialises its hyperscan databases). A separate interpreter started with
`-m`, not multiprocessing's spawn: spawn re-imports the parent's `__main__`, which in a script without an
`if __name__ == "__main__":` guard runs the script again.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from core.policy.errors import PolicyError
from core.policy.loading import load_policy_set


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m core.policy.worker POLICIES_DIR", file=sys.stderr)
        return 2
    result: object
    try:
        result = load_policy_set(Path(argv[0]))
    except PolicyError as exc:
        result = exc  # an invalid rule set is an answer, not a crash: the parent reports it like any reload
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
