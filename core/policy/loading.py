"""Reading rule files into a compiled `PolicySet`, and keeping the last good set when a reload fails.

`load_policy_set` parses, validates and compiles every file of a directory completely, or raises a
`PolicyError` located by file, rule id and field. `RuleSetLoader` holds the active set: the initial
load must succeed (the server refuses to start otherwise); a reload that fails keeps the active set
and reports why; `watch` reloads whenever a rule file changes.

Compiling a large rule set takes seconds (YAML, validation, pattern analysis, hyperscan databases), so the
server reloads with `reload_off_loop`: one at a time, in a worker *process* (`python -m core.policy.worker`,
one per reload), and the set comes back pickled (hyperscan databases serialised). A thread was not enough:
hyperscan releases the GIL, but the Python half of a compile holds it in slices, and on a busy machine the OS
preempting that thread while it holds the GIL stalled the event loop for up to 2 s during a 500-rule reload
(bench/policy_bench.py). If the worker cannot run, the reload falls back to a thread. Streams keep flowing
either way (tests/serve/policy/test_reload_off_loop.py measures their inter-chunk gap during a reload).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core.policy.compiler import CompiledStage, MatchRuleModel, compile_stage
from core.policy.errors import PolicyError
from core.policy.metrics import PolicyMetrics
from core.policy.results import ReloadResult
from core.policy.schema import MATCH_KINDS, RuleFile

log = logging.getLogger("secondstage.policy")

# libyaml's safe loader when PyYAML was built with it: the pure-Python one spent ~1 s of a 1,000-rule reload
# holding the GIL (the event loop's streams wait for it); both accept the same YAML and report the same marks.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class PolicySet:
    """One loaded, compiled rule set. Immutable once built; a reload builds a new one."""

    version: str  # content hash of every rule file (name and bytes)
    rules: list[Any]  # rule models, in order: files by name, rules in file order
    rule_files: dict[str, str]  # rule id -> file it came from
    stages: dict[str, CompiledStage]
    files: list[str]
    _by_kind: dict[type[Any], list[Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def hold_back(self) -> int:
        """Most characters the output filter can hold back (the widest output rule that changes text)."""
        return self.stages["output"].hold_back

    def of_kind(self, kind: type[Any]) -> list[Any]:
        """The rules of one model class (LimitRule, UnicodeRule, …), in order; built once per set."""
        if self._by_kind is None:
            by_kind: dict[type[Any], list[Any]] = {}
            for r in self.rules:
                by_kind.setdefault(type(r), []).append(r)
            self._by_kind = by_kind
        return self._by_kind.get(kind, [])

    def rule(self, rule_id: str) -> Any | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for r in self.rules:
            item: dict[str, Any] = {
                "id": r.id,
                "kind": r.kind,
                "action": r.action,
                "mode": r.mode,
                "stages": list(r.stages),
                "description": r.description,
                "file": self.rule_files[r.id],
            }
            if r.scope is not None:
                item["scope"] = r.scope.model_dump(exclude_none=True)
            out.append(item)
        return out


def _rule_files(policies_dir: Path) -> list[Path]:
    if not policies_dir.is_dir():
        raise PolicyError(f"policies directory {str(policies_dir)!r} does not exist; create it or set policies_dir")
    return sorted(
        p
        for p in policies_dir.iterdir()
        if p.is_file() and p.suffix in (".yaml", ".yml") and not p.name.startswith((".", "#"))
    )


def _validation_error(exc: ValidationError, data: Any, file: str) -> PolicyError:
    err = exc.errors()[0]
    loc = list(err["loc"])
    rule_id = None
    fld: str | None = None
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        raw = data.get("rules", [])[loc[1]] if isinstance(data, dict) else None
        rule_id = str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") is not None else f"#{loc[1] + 1}"
        rest = loc[2:]
        if rest and rest[0] in (*MATCH_KINDS, "limit", "instructions", "unicode"):
            rest = rest[1:]  # the union's tag, not a field
        if err["type"].startswith("union_tag"):
            rest = ["kind"]
        fld = ".".join(str(p) for p in rest) or None
    else:
        fld = ".".join(str(p) for p in loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/policies.md)"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''} in this file)"
    return PolicyError(msg, file=file, rule_id=rule_id, field=fld)


def load_policy_set(policies_dir: Path) -> PolicySet:
    """Parse, validate and compile every rule file in `policies_dir`; PolicyError on the first problem."""
    paths = _rule_files(policies_dir)
    digest = hashlib.sha256()
    rules: list[Any] = []
    rule_files: dict[str, str] = {}
    for path in paths:
        file = str(path)
        raw = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        try:
            data = yaml.load(raw, Loader=_YAML_LOADER)  # a safe loader (libyaml or Python)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise PolicyError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=file) from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise PolicyError("a rule file must be a mapping with a `rules:` list", file=file)
        try:
            parsed = RuleFile.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc, data, file) from None
        defaults = parsed.defaults
        for rule in parsed.rules:
            update: dict[str, Any] = {}
            if defaults is not None and defaults.mode is not None and "mode" not in rule.model_fields_set:
                update["mode"] = defaults.mode
            if defaults is not None and defaults.refusal is not None and getattr(rule, "refusal", "") is None:
                update["refusal"] = defaults.refusal
            if update:
                rule = rule.model_copy(update=update)
            if rule.id in rule_files:
                raise PolicyError(
                    f"duplicate rule id (also defined in {rule_files[rule.id]})", file=file, rule_id=rule.id, field="id"
                )
            rule_files[rule.id] = file
            rules.append(rule)
    stages = {}
    for stage in ("input", "output"):
        entries: list[tuple[MatchRuleModel, str]] = [
            (r, rule_files[r.id]) for r in rules if r.kind in MATCH_KINDS and stage in r.stages
        ]
        stages[stage] = compile_stage(entries)
    return PolicySet(
        version=digest.hexdigest()[:16],
        rules=rules,
        rule_files=rule_files,
        stages=stages,
        files=[str(p) for p in paths],
    )


class WorkerFailed(Exception):
    """The compile worker process did not answer with a rule set or a PolicyError."""


async def _compile_in_worker(policies_dir: Path) -> PolicySet:
    """`load_policy_set` in `python -m core.policy.worker` (see worker.py); raises its PolicyError."""
    root = str(Path(__file__).resolve().parents[2])  # the directory that holds the `core` package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.policy.worker", str(policies_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise WorkerFailed(f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-500:]}")
    # Unpickling runs Python (pydantic models, re.compile): in a thread, so the loop keeps its turns.
    result = await asyncio.to_thread(pickle.loads, out)
    if isinstance(result, PolicyError):
        raise result
    if not isinstance(result, PolicySet):
        raise WorkerFailed(f"answered a {type(result).__name__}, not a PolicySet")
    return result


class ReloadBusy(Exception):
    """A reload is already running (`reload_off_loop(wait=False)`)."""


class RuleSetLoader:
    """The active rule set of one directory: loaded once, reloaded safely, optionally watched."""

    def __init__(self, policies_dir: Path, metrics: PolicyMetrics) -> None:
        self.policies_dir = Path(policies_dir)
        self._metrics = metrics
        self.current: PolicySet | None = None
        self._reloading = asyncio.Lock()

    @property
    def reloading(self) -> bool:
        return self._reloading.locked()

    async def reload_off_loop(self, *, wait: bool = True) -> ReloadResult:
        """`reload` in a worker process, one at a time; with wait=False, ReloadBusy while another runs."""
        if not wait and self._reloading.locked():
            raise ReloadBusy("a policy reload is already running")
        async with self._reloading:
            previous = self.current.version if self.current is not None else None
            try:
                new = await _compile_in_worker(self.policies_dir)
            except PolicyError as exc:
                return self._rejected(exc, previous)
            except (WorkerFailed, OSError, pickle.UnpicklingError, EOFError) as exc:
                log.warning("policy compile worker failed (%s); compiling in a thread instead", exc)
                return await asyncio.to_thread(self.reload)
            return self._install(new, previous)

    def load(self) -> PolicySet:
        """Initial load: raises PolicyError on any invalid file (the server should refuse to start)."""
        self.current = load_policy_set(self.policies_dir)
        self._metrics.set_version(self.current.version)
        log.info(
            "policy rule set %s loaded: %d rules from %d files, output hold-back %d chars",
            self.current.version,
            len(self.current.rules),
            len(self.current.files),
            self.current.hold_back,
        )
        return self.current

    def reload(self) -> ReloadResult:
        """Build the set from the files again; on error keep the active one and report why."""
        previous = self.current.version if self.current is not None else None
        try:
            new = load_policy_set(self.policies_dir)
        except PolicyError as exc:
            return self._rejected(exc, previous)
        return self._install(new, previous)

    def _rejected(self, exc: PolicyError, previous: str | None) -> ReloadResult:
        self._metrics.reloads.labels(result="error").inc()
        log.error("policy reload rejected, keeping rule set %s: %s", previous, exc)
        return ReloadResult(ok=False, version=previous or "", previous_version=previous, error=exc)

    def _install(self, new: PolicySet, previous: str | None) -> ReloadResult:
        self.current = new
        self._metrics.reloads.labels(result="ok").inc()
        self._metrics.set_version(new.version)
        if new.version != previous:
            log.info("policy rule set %s -> %s (%d rules)", previous, new.version, len(new.rules))
        return ReloadResult(ok=True, version=new.version, previous_version=previous)

    async def watch(self, stop_event: asyncio.Event, *, debounce_ms: int = 300) -> None:
        """Reload whenever a rule file in the directory changes, until `stop_event` is set.

        Also when Kubernetes updates a mounted ConfigMap: it writes the files into a new `..<timestamp>/`
        directory and renames a new `..data` symlink over the old one, while `a.yaml` stays a symlink to
        `..data/a.yaml`, so no `.yaml` path changes; the swap shows only as `..data` (and `..<timestamp>`)
        changing, which this filter lets through.
        """
        import watchfiles

        def rule_files_or_configmap(_change: watchfiles.Change, path: str) -> bool:
            name = Path(path).name
            return name.endswith((".yaml", ".yml")) or name == "..data"

        async for _changes in watchfiles.awatch(
            self.policies_dir,
            watch_filter=rule_files_or_configmap,
            stop_event=stop_event,
            debounce=debounce_ms,
            recursive=False,
        ):
            await self.reload_off_loop()
