"""Latency before and after a change, interleaved: `python -m bench.compare_commits`.

Runs `bench.latency` from two commits of this repository in the same run:
each commit gets its own `git worktree` (so edits cannot change code under a
running job), and every round runs both at once, one single-threaded
process per core, the commits swapping cores from one round to the next, so
that a busy core or a slow period weighs on both alike. Each `bench.latency`
run times its own full model beside the engine, so the speed-ups are ratios
measured in one process; the report gives, per operating point, the median
over rounds of both commits' full-model and engine times and speed-ups.

Usage:

    python -m bench.compare_commits --before=7fe7dd6 --after=HEAD --rounds=2 \\
        --output=/tmp/compare -- --models=vgg16 --batch_sizes=1,64 --targets=3,5 \\
        --memory=false --no_agent_variant=false --repeats=3 --warmup=1

Everything after `--` goes to `bench.latency` (its `--output` is set here).
Outputs (in `--output`): `compare.json`, `compare.md`, and each run's own
`latency.json` under `<commit>_r<round>/`.
"""

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

FLAGS = flags.FLAGS
KEY = ("model", "batch_size", "mode", "target_speedup")


def define_flags(flag_values=FLAGS):
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("before", None, "The commit before the change.", **fv)
    flags.DEFINE_string("after", "HEAD", "The commit after the change.", **fv)
    flags.DEFINE_integer("rounds", 2, "Rounds; each runs both commits at once, one per core.", lower_bound=1, **fv)
    flags.DEFINE_string("output", None, "Directory of compare.json / compare.md (required).", **fv)
    flags.mark_flags_as_required(["before", "output"], flag_values=flag_values)


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _environment(core):
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    return env, ["taskset", "-c", str(core)]


def run_rounds(checkouts, rounds, latency_flags, output):
    """Runs `bench.latency` in every checkout, both at once per round; returns {name: [latency.json dicts]}.

    Args:
        checkouts: `{name: path}` of two worktrees.
        rounds: how many rounds.
        latency_flags: flags for `bench.latency` (without `--output`).
        output: the directory the runs write into.
    """
    names = list(checkouts)
    results = {name: [] for name in names}
    for r in range(rounds):
        procs = []
        for i, name in enumerate(names):
            core = (i + r) % 2
            directory = output / f"{name}_r{r}"
            env, pin = _environment(core)
            command = pin + [sys.executable, "-m", "bench.latency", *latency_flags, f"--output={directory}"]
            log = open(output / f"{name}_r{r}.log", "w")
            procs.append((name, directory, log, subprocess.Popen(command, cwd=checkouts[name], env=env,
                                                                  stdout=log, stderr=subprocess.STDOUT)))
        for name, directory, log, proc in procs:
            code = proc.wait()
            log.close()
            if code != 0:
                raise RuntimeError(f"bench.latency of {name} failed in round {r} (exit {code}): see {log.name}")
            results[name].append(json.loads((directory / "latency.json").read_text()))
    return results


def compare(results, before, after):
    """Per operating point, the median over rounds of both commits' times and speed-ups.

    Args:
        results: `{name: [latency.json dicts]}` of `run_rounds`.
        before, after: the two names.

    Returns:
        A list of row dicts.

    Example:

    >>> row = {"model": "m", "batch_size": 1, "mode": "uniform", "target_speedup": 3.0,
    ...        "theoretical_speedup": 3.0, "full_ms": 10.0, "rnp_ms": 4.0, "measured_speedup": 2.5}
    >>> compare({"a": [{"rows": [row]}], "b": [{"rows": [dict(row, rnp_ms=5.0, measured_speedup=2.0)]}]},
    ...         "a", "b")[0]["speedup_change"]
    -0.2
    """
    def by_point(name):
        points = {}
        for run in results[name]:
            for row in run["rows"]:
                points.setdefault(tuple(row[k] for k in KEY), []).append(row)
        return points

    old, new = by_point(before), by_point(after)
    rows = []
    for key in sorted(set(old) & set(new), key=str):
        row = dict(zip(KEY, key))
        row["theoretical_speedup"] = old[key][0]["theoretical_speedup"]
        for side, points in (("before", old[key]), ("after", new[key])):
            for field in ("full_ms", "rnp_ms", "measured_speedup"):
                row[f"{side}_{field}"] = statistics.median(p[field] for p in points)
            row[f"{side}_rounds"] = [round(p["measured_speedup"], 3) for p in points]
        row["speedup_change"] = round(row["after_measured_speedup"] / row["before_measured_speedup"] - 1.0, 4)
        rows.append(row)
    return rows


def markdown(rows, meta):
    lines = [
        f"# Engine latency before and after ({meta['date']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Before: `{meta['before']}`, after: `{meta['after']}`, {meta['rounds']} round(s), one single-threaded "
        f"process per core, the commits swapping cores each round. Machine: {meta['machine']}.",
        "",
        "| model | batch | actions | theoretical | full ms before / after | engine ms before / after | "
        "speed-up before / after (per round) | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['mode']} | {r['theoretical_speedup']:.2f}x | "
            f"{r['before_full_ms']:.1f} / {r['after_full_ms']:.1f} | {r['before_rnp_ms']:.1f} / {r['after_rnp_ms']:.1f} | "
            f"{r['before_measured_speedup']:.2f}x / {r['after_measured_speedup']:.2f}x "
            f"({r['before_rounds']} / {r['after_rounds']}) | {100 * r['speedup_change']:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    latency_flags = argv[1:]
    if any(f.startswith("--output") for f in latency_flags):
        raise app.UsageError("Give --output to bench.compare_commits, not to bench.latency (after --).")
    repo = pathlib.Path(_git("rev-parse", "--show-toplevel"))
    output = pathlib.Path(FLAGS.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    commits = {"before": _git("rev-parse", FLAGS.before, cwd=repo), "after": _git("rev-parse", FLAGS.after, cwd=repo)}
    with tempfile.TemporaryDirectory(prefix="rnp_compare_") as tmp:
        checkouts = {}
        try:
            for name, commit in commits.items():
                checkouts[name] = pathlib.Path(tmp) / name
                _git("worktree", "add", "--detach", str(checkouts[name]), commit, cwd=repo)
            results = run_rounds(checkouts, FLAGS.rounds, latency_flags, output)
        finally:
            for path in checkouts.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=repo, capture_output=True)
    rows = compare(results, "before", "after")
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.compare_commits", *sys.argv[1:]]),
        "before": commits["before"][:12],
        "after": commits["after"][:12],
        "rounds": FLAGS.rounds,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
    }
    (output / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (output / "compare.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    define_flags()
    app.run(main)
