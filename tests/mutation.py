#!/usr/bin/env python3
"""Mutation testing of the per-signature path: how many mutants of its modules the suite kills.

Usage: .venv/bin/python tests/mutation.py [--sample N] [--seed S] [--module PATH ...]
           [--work DIR] [--list] [--report FILE] [--part K/N] [--only N,...] [--full]
       .venv/bin/python tests/mutation.py --merge REPORT ...

Run outside CI, as root (the suite's ordinary-user tests need it); a mutant
runs part of the suite, so 60 mutants take about an hour on 2 cores.

Each mutant is one change at one place of one module (below): a comparison
turned around (``<`` and ``<=``, ``==`` and ``!=``, ``in`` and ``not in``,
``is`` and ``is not``), ``and`` and ``or`` swapped, an arithmetic or bit
operator replaced, a ``not`` dropped, a number plus one, ``True`` and
``False`` swapped, ``break`` and ``continue`` swapped, a returned value made
``None``, or a string that is a table entry, an argv word or a compared value
changed (an error message is not: the suite checks names, not wording).

The mutant is written into a scratch copy of this tree (``--work``, default
/var/tmp/lap-mutation) and into the copy's own venv, a non-editable install as
CI tests it, so that the command-line tests run the mutant too. Then the test
files that exercise that module (``TESTS``) run with ``-x``. A failure kills
the mutant when the failed test fails again alone on the mutant and passes
alone on the unmutated code (else the run is redone once, then "flaky"; a
test that fails on the unmutated code too is an "error"); a run over half an
hour kills it too (a hang), and so does an import the mutant breaks. A mutant
that survives is a change the suite would not notice, unless it changes nothing
(an equivalent mutant): ``EQUIVALENT`` names those, each with why, and the
score leaves them out: killed / (mutants - equivalent), and a second time with
the mutants equivalent only "in effect" counted as living.

The sample is drawn with ``--seed`` from every mutant of the modules, so the
same seed on the same tree gives the same mutants; ``--list`` prints them and
runs nothing. A JSON report goes to ``--report``. ``--part K/N`` runs every Nth
mutant of the sample, so that N runs, each with its own ``--work``, share it;
``--only N,...`` runs the sample's mutants of those numbers, and ``--full`` the
whole suite on each (a mutant that survives its module's test files may die in
another's: the score counts survivors of the whole suite only). ``--merge``
scores reports together, a later outcome of a mutant replacing an earlier one.
"""

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PER_SIGNATURE = "lap_pkcs11/per_signature/"
# The test files that exercise each module, the quickest to fail first.
TESTS = {
    "envfile.py": ["test_config.py", "test_mirror_tables.py", "test_edges.py",
                   "test_properties.py", "test_sign_contract.py", "test_hardening.py"],
    "options.py": ["test_config.py", "test_edges.py", "test_mirror_tables.py",
                   "test_sign_contract.py", "test_sign_errors.py", "test_client.py",
                   "test_hardening.py"],
    "config.py": ["test_config.py", "test_edges.py", "test_uri.py", "test_sign_contract.py",
                  "test_sign_errors.py", "test_client.py", "test_properties.py",
                  "test_hardening.py"],
    "uri.py": ["test_uri.py", "test_config.py", "test_edges.py"],
    "ed25519.py": ["test_vectors.py", "test_edges.py", "test_client.py"],
    "wire.py": ["test_client.py", "test_client_fuzz.py", "test_edges.py"],
    "errors.py": ["test_mirror_tables.py", "test_sign_errors.py", "test_client.py",
                  "test_edges.py"],
    "files.py": ["test_pin_guard.py", "test_hardening.py", "test_edges.py",
                 "test_sign_errors.py"],
    "process.py": ["test_edges.py", "test_hardening.py", "test_sign_contract.py",
                   "test_sign_process.py", "test_client.py"],
    "sign_command.py": ["test_sign_contract.py", "test_edges.py", "test_sign_errors.py",
                        "test_hardening.py", "test_sign_process.py"],
    "client_command.py": ["test_client.py", "test_edges.py", "test_client_fuzz.py"],
    "serve_command.py": ["test_client.py", "test_edges.py", "test_hardening.py"],
    "signer.py": ["test_sign_errors.py", "test_edges.py", "test_pin_guard.py",
                  "test_sign_contract.py", "test_deadline_grace.py", "test_sign_process.py",
                  "test_hardening.py"],
    "pkcs11_tool.py": ["test_edges.py", "test_units.py", "test_sign_errors.py",
                       "test_deadline_grace.py",
                       "test_sign_process.py", "test_listings.py", "test_sign_contract.py",
                       "test_hardening.py"],
}
MODULES = [PER_SIGNATURE + name for name in TESTS if name != "pkcs11_tool.py"] + [
    "lap_pkcs11/backends/pkcs11_tool.py"]
# Mutants that change nothing the program does, by id (lines of this tree), each with
# why; "in effect": a change of timing below what any caller or test can tell apart.
EQUIVALENT = {
    "lap_pkcs11/backends/pkcs11_tool.py:182:return-none:return True":
        "_kill_holders gives None for True only when the watchdog's stat cannot be read: "
        "it was reaped (Deadline.watching), so Deadline.watchdog is None already and the "
        "caller's 'if not searched: self.watchdog = None' changes nothing",
    "lap_pkcs11/backends/pkcs11_tool.py:797:number:1":
        "_object_kind keeps the first piece of line.split(';', 1): with 2 for 1, the same piece",
    "lap_pkcs11/backends/pkcs11_tool.py:258:number:1000":
        "in effect: the watchdog's backstop moves by 20 us (BACKSTOP_SLACK_MS / 1001); its "
        "clock, /proc/uptime, steps by 10 ms",
    "lap_pkcs11/per_signature/process.py:33:number:1":
        "in effect: harden() closes descriptors up to 2 << 20 instead of 1 << 20; no "
        "descriptor can be numbered that high unless fs.nr_open (1048576 by default) is raised",
    "lap_pkcs11/per_signature/process.py:68:bool-constant:False":
        "no_core_dumps(public=True) by default: the public ctypes module calls the same prctl "
        "and setrlimit; only the import's cost differs (the suite runs both, 'python-public')",
    "lap_pkcs11/per_signature/process.py:261:return-none:return False":
        "wait_readable gives None for False at its deadline; its three callers test 'not'",
    "lap_pkcs11/per_signature/process.py:272:compare-Is:wakeup_fd is None":
        "in effect: pause() then sleeps with time.sleep, not a poll woken by a signal; its one "
        "caller pauses 2 ms at a time (LOCK_POLL_SECONDS) and checks for a noted signal "
        "before and after, so a signal is acted on at most 2 ms later (the other branch is "
        "never taken: begin() installs the wakeup pipe first)",
    "lap_pkcs11/per_signature/sign_command.py:105:number:1000":
        "in effect: the caller's end computed 0.1% early (2 ms of a 2 s SIGNER_TIMEOUT_SECONDS); "
        "a tool in its grace is killed 2 ms sooner",
}
# A mutant whose tests run longer than this is killed (it hangs).
TIMEOUT = 1800

_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult,
           ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.LShift: ast.RShift,
           ast.RShift: ast.LShift, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr,
           ast.BitXor: ast.BitOr}


class Mutant:
    __slots__ = ("module", "line", "start", "end", "before", "after", "what")

    def __init__(self, module, source, node, replacement, what, statement=False):
        self.module, self.line, self.what = module, node.lineno, what
        self.start = _offset(source, node.lineno, node.col_offset)
        self.end = _offset(source, node.end_lineno, node.end_col_offset)
        self.before = source[self.start:self.end].decode()
        self.after = replacement if statement else f"({replacement})"

    @property
    def id(self):
        return f"{self.module}:{self.line}:{self.what}:{' '.join(self.before.split())[:60]}"

    def apply(self, source):
        return source[:self.start] + self.after.encode() + source[self.end:]


def _offset(source, line, column):
    """The byte offset of (line, UTF-8 column) in ``source``."""
    start = 0
    for _ in range(line - 1):
        start = source.index(b"\n", start) + 1
    return start + column


def _inside_messages(tree):
    """Nodes inside f-strings, docstrings and raised exceptions (their wording is not what
    the suite checks), and ``__slots__`` (a wrong name fails on the first assignment)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            skip.update(id(child) for child in ast.walk(node))
        if isinstance(node, ast.Raise) and node.exc is not None:
            skip.update(id(child) for child in ast.walk(node.exc))
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and
                                                target.id == "__slots__"
                                                for target in node.targets):
            skip.update(id(child) for child in ast.walk(node.value))  # fails at once
    return skip


def _mutated(node, **changes):
    copy = ast.fix_missing_locations(type(node)(**{**{field: getattr(node, field, None)
                                                         for field in node._fields}, **changes}))
    return ast.unparse(copy)


def mutants_of(module):
    source = (ROOT / module).read_bytes()
    tree = ast.parse(source)
    skip = _inside_messages(tree)
    parents = {id(child): parent for parent in ast.walk(tree)
               for child in ast.iter_child_nodes(parent)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE:
                    ops = list(node.ops)
                    ops[i] = _COMPARE[type(op)]()
                    found.append(Mutant(module, source, node, _mutated(node, ops=ops),
                                        f"compare-{type(op).__name__}"))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            found.append(Mutant(module, source, node, _mutated(node, op=other),
                                f"bool-{type(node.op).__name__}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            if isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
                continue  # a %-format
            found.append(Mutant(module, source, node, _mutated(node, op=_BINARY[type(node.op)]()),
                                f"binary-{type(node.op).__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append(Mutant(module, source, node, ast.unparse(node.operand), "drop-not"))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            found.append(Mutant(module, source, node, repr(not node.value), "bool-constant"))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            found.append(Mutant(module, source, node, repr(node.value + 1), "number"))
        elif isinstance(node, ast.Constant) and type(node.value) is str and node.value and \
                isinstance(parents.get(id(node)), (ast.List, ast.Tuple, ast.Set, ast.Dict,
                                                    ast.Compare)):
            found.append(Mutant(module, source, node, repr("XX" + node.value + "XX"), "string"))
        elif isinstance(node, (ast.Break, ast.Continue)):
            other = "continue" if isinstance(node, ast.Break) else "break"
            found.append(Mutant(module, source, node, other, "loop", statement=True))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            found.append(Mutant(module, source, node, "return None", "return-none",
                                statement=True))
    for mutant in found:  # every mutant must still compile
        compile(mutant.apply(source), module, "exec")
    return found


def prepare(work):
    """A scratch copy of the tree with its own venv (the tree as committed, plus edits)."""
    copy = work / "tree"
    if copy.exists():
        shutil.rmtree(copy)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, files):
        target = copy / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / os.fsdecode(name)).exists():
            shutil.copy2(ROOT / os.fsdecode(name), target)
    venv = work / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{copy}[test,agent]"],
                       check=True)
    else:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                        "--force-reinstall", str(copy)], check=True)
    shutil.rmtree(copy / "build", ignore_errors=True)
    where = "import lap_pkcs11, os; print(os.path.dirname(lap_pkcs11.__file__))"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-I", "-c", where],
                               capture_output=True, text=True, check=True).stdout.strip())
    return copy, venv, site.parent


def run_tests(copy, venv, tests, timeout):
    """(outcome, seconds, the failed tests' ids) of ``tests`` run with -x in ``copy``."""
    started = time.monotonic()
    try:
        result = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-x", "-q",
                                 "-p", "no:cacheprovider", *tests], cwd=copy,
                                capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        # 2 and 4: collection or conftest failed, the mutant breaks an import: no test can run.
        outcome = {0: "survived", 1: "killed", 2: "killed (no test runs)",
                   4: "killed (no test runs)"}.get(result.returncode, f"error {result.returncode}")
        # "FAILED tests/x.py::name[a parameter id] - the error"
        failed = [line.split(" ", 1)[1].split(" - ", 1)[0] for line in result.stdout.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))]
    except subprocess.TimeoutExpired:
        outcome, failed = "killed (timeout)", []
    return outcome, time.monotonic() - started, failed


class Mutated:
    """``mutant`` written into the copy's tree and its installed package while inside."""

    def __init__(self, mutant, copy, site):
        self.mutant = mutant
        self.targets = [copy / mutant.module, site / mutant.module]
        self.original = self.targets[0].read_bytes()

    def _write(self, data):
        for target in self.targets:
            target.write_bytes(data)
            shutil.rmtree(target.parent / "__pycache__", ignore_errors=True)

    def __enter__(self):
        self._write(self.mutant.apply(self.original))
        return self

    def __exit__(self, *exc):
        self._write(self.original)


def judge(mutant, copy, venv, site, full=False):
    """Run the module's tests (``full``: the whole suite) on ``mutant``. A kill counts once
    the failed test also fails alone on the mutant and passes alone on the unmutated
    code: a test that failed under load, or fails whatever the code (the host), kills
    nothing."""
    first = TESTS[Path(mutant.module).name]
    rest = sorted(path.name for path in (ROOT / "tests").glob("test_*.py")) if full else []
    tests = [f"tests/{name}" for name in first + [name for name in rest if name not in first]]
    for _ in range(2):
        with Mutated(mutant, copy, site):
            outcome, seconds, failed = run_tests(copy, venv, tests, TIMEOUT)
            if outcome != "killed" or not failed:
                return outcome, seconds, failed
            again = run_tests(copy, venv, failed, TIMEOUT)[0]
        if again == "killed":
            if run_tests(copy, venv, failed, TIMEOUT)[0] == "survived":
                return outcome, seconds, failed
            return "error (fails unmutated)", seconds, failed
    return "flaky", seconds, failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--module", action="append", help="a module path; default: all of them")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/lap-mutation"))
    parser.add_argument("--list", action="store_true", help="print the sample, run nothing")
    parser.add_argument("--report", type=Path, help="write the outcomes as JSON here")
    parser.add_argument("--part", default="0/1",
                        help="K/N: run every Nth mutant of the sample from the Kth (0-based), "
                             "for N runs side by side, each with its own --work")
    parser.add_argument("--only", help="N,N,...: only these mutants of the sample (its numbers)")
    parser.add_argument("--full", action="store_true",
                        help="run the whole suite on each mutant, not the module's test files "
                             "(to confirm that a mutant survives)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="REPORT",
                        help="run nothing: the score of these reports (a later outcome of a "
                             "mutant replaces an earlier one, e.g. a --full rerun)")
    args = parser.parse_args()
    if args.merge:
        score([item for report in args.merge for item in json.loads(report.read_text())])
        return 0
    part, parts = map(int, args.part.split("/"))
    modules = args.module or MODULES
    every = [mutant for module in modules for mutant in mutants_of(module)]
    sample = random.Random(args.seed).sample(every, min(args.sample, len(every)))
    sample.sort(key=lambda mutant: (mutant.module, mutant.start))
    print(f"{len(sample)} of {len(every)} mutants of {len(modules)} modules, seed {args.seed}")
    if args.list:
        for mutant in sample:
            print(f"{mutant.id}  ->  {mutant.after}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    copy, venv, site = prepare(args.work)
    outcomes = []
    only = {int(number) for number in args.only.split(",")} if args.only else None
    for number, mutant in enumerate(sample, 1):
        if (number - 1) % parts != part or (only is not None and number not in only):
            continue
        outcome, seconds, failed = judge(mutant, copy, venv, site, args.full)
        equivalent = EQUIVALENT.get(mutant.id)
        if equivalent and outcome == "survived":
            outcome = "equivalent"
        outcomes.append({"id": mutant.id, "after": mutant.after, "outcome": outcome,
                         "seconds": round(seconds, 1), "failed": failed})
        print(f"[{number}/{len(sample)}] {outcome:16s} {seconds:6.0f}s  {mutant.id}  ->  "
              f"{mutant.after}  {' '.join(failed[:1])}", flush=True)
    if args.report:
        args.report.write_text(json.dumps(outcomes, indent=1) + "\n")
    score(outcomes)
    return 0


def score(outcomes):
    """Print the score of ``outcomes`` (later ones of an id replace earlier ones), the
    equivalent mutants left out with why, and the mutants that lived."""
    final = {}
    for item in outcomes:
        final[item["id"]] = item
    items = list(final.values())
    for item in items:
        if item["outcome"] == "survived" and item["id"] in EQUIVALENT:
            item["outcome"] = "equivalent"
    killed = sum(item["outcome"].startswith("killed") for item in items)
    counted = [item for item in items if item["outcome"] != "equivalent"]
    in_effect = [item for item in items if item["outcome"] == "equivalent" and
                 EQUIVALENT[item["id"]].startswith("in effect")]
    if not counted:
        print("no mutants")
        return
    print(f"{len(items)} mutants: killed {killed} of {len(counted)} non-equivalent, "
          f"{100 * killed / len(counted):.0f}% ({killed} of {len(counted) + len(in_effect)}, "
          f"{100 * killed / (len(counted) + len(in_effect)):.0f}%, with the {len(in_effect)} "
          "equivalent only in effect counted as living)")
    for item in items:
        if item["outcome"] == "equivalent":
            print(f"  equivalent: {item['id']}: {EQUIVALENT[item['id']]}")
    for item in counted:
        if not item["outcome"].startswith("killed"):
            print(f"  {item['outcome']}: {item['id']}  ->  {item['after']}")


if __name__ == "__main__":
    sys.exit(main())
