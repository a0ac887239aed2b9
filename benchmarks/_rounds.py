"""Parent side of the step-time benchmarks: each measurement runs in a fresh interpreter that
prints its result as one ``MARK`` + JSON line (``run_fresh``), the setups are interleaved over
rounds, each round starting one setup later (``rotated``, ``run_rounds``), and per setup the
round with the lowest median is kept, marked noisy when the round medians differ by more than
``NOISY`` (``best_round``, ``print_table``, ``print_ratios``). ``step_time.py`` and
``mcore_step_time.py`` use all of it; ``adapter_step_time.py`` (its own table, a failed setup
retried in the next round) uses ``run_fresh`` and ``rotated``.

A run is named by its key, a tuple that ends with the setup (``(model, size, setup)`` in
``step_time.py`` and ``mcore_step_time.py``); the key without the setup (its prefix) names the
group whose setups take turns in each round."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

NOISY = 0.15  # round medians of one setup further apart than this (relative): the machine was busy


def add_run_arguments(parser, default_steps, warmup, rounds, timeout):
    """The options every step-time script takes: --steps, --warmup, --rounds, --threads,
    --timeout, --tail, and the hidden --child (the JSON spec of one fresh-interpreter run)."""
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per setup (default: {default_steps})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"untimed steps first, the first compiles the graph (default {warmup})")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="fresh processes per setup, interleaved; the table shows the round with "
                             f"the lowest median (the least disturbed by other load) (default {rounds})")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU kernel threads (ms.device_context.cpu.op_tuning.threads_num); "
                             "0 = MindSpore's default (default 0)")
    parser.add_argument("--timeout", type=int, default=timeout, help=f"seconds per setup (default {timeout})")
    parser.add_argument("--tail", type=int, default=25, help="output lines shown of a failed setup")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def chosen(parser, args, known):
    """The comma lists of ``args`` named by ``known`` ({"--option": the names it accepts}), each
    checked (an unknown or empty choice is a parser error), with --warmup / --steps / --rounds."""
    lists = []
    for option, names in known.items():
        picked = [c for c in getattr(args, option[2:]).split(",") if c]
        bad = [c for c in picked if c not in names]
        if bad or not picked:
            parser.error(f"{option}: unknown {bad or picked}; choose from {list(names)}")
        lists.append(picked)
    if args.warmup < 1 or args.rounds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--warmup, --steps and --rounds must be >= 1 (the first warmup step compiles)")
    return lists


def run_fresh(script, mark, spec, prefix, timeout, tail, tail_label="last {tail} lines of its output"):
    """``script --child <spec as JSON>`` in a fresh interpreter, in its own temporary working
    directory (named ``prefix``...; MindFormers writes ./output there), MindSpore's logs at
    ``GLOG_v`` 3 unless set; returns (result or None, wall s, error text or None). The result is
    the JSON after ``mark`` on the child's stdout; without it, the error text gives the exit code
    (or the timeout) and the last ``tail`` lines of the child's output."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        def text(data):  # bytes even with text=True
            return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
        out, err, code = text(exc.stdout), text(exc.stderr), f"timeout after {timeout} s"
    finally:
        wall = time.perf_counter() - start
        shutil.rmtree(workdir, ignore_errors=True)
    for line in out.splitlines():
        if line.startswith(mark):
            return json.loads(line[len(mark):]), wall, None
    lines = (out + "\n" + err).strip().splitlines()
    return None, wall, f"exit {code}; {tail_label.format(tail=tail)}:\n" + "\n".join(
        "    " + line for line in lines[-tail:])


def rotated(setups, round_no):
    """The order of ``setups`` in round ``round_no`` (from 0): each round starts one setup later,
    so a burst of other load hits a different setup."""
    shift = round_no % len(setups)
    return setups[shift:] + setups[:shift]


def run_rounds(groups, rounds, run, arch_key):
    """Runs every setup of every group ``rounds`` times, group after group, the rounds interleaved
    (``rotated``); a setup that failed once is not run again (its traceback is not repeated).
    ``groups``: [(key prefix, [setup, ...])] in table order; ``run(key)`` -> (result or None,
    wall s, error text). Prints a line per run (``arch_key``: the result's field naming what was
    built); returns {key: [result or None per round]} in table order."""
    runs = {prefix + (setup,): [] for prefix, setups in groups for setup in setups}
    for prefix, setups in groups:
        for round_no in range(rounds):
            for setup in rotated(setups, round_no):
                key = prefix + (setup,)
                if None in runs[key]:  # failed once: do not repeat its traceback
                    continue
                res, wall, error = run(key)
                name = " ".join(key)
                runs[key].append(res)
                if res is None:
                    print(f"\n[{name}] FAILED after {wall:.1f} s: {error}\n", flush=True)
                    continue
                print(f"  [{name} round {round_no + 1}] {res['median_ms']:.1f} ms/step "
                      f"({res[arch_key]}, {wall:.1f} s, load {os.getloadavg()[0]:.2f})", flush=True)
    return runs


def any_failed(runs):
    """Whether some round of ``runs`` (as ``run_rounds`` returns it) failed: the exit code 1."""
    return any(None in rounds for rounds in runs.values())


def best_round(rounds):
    """The round with the lowest median (None for a failed round); None if every round failed.
    Keeps every round's median for the table."""
    done = [r for r in rounds if r is not None]
    if not done:
        return None
    best = dict(min(done, key=lambda r: r["median_ms"]))
    medians = [r["median_ms"] for r in done]
    best["rounds_text"] = "/".join("failed" if r is None else f"{r['median_ms']:.1f}" for r in rounds)
    best["noisy"] = max(medians) > (1 + NOISY) * min(medians)
    return best


def print_table(runs, key_names):
    """``runs``: {key: [result or None per round]} in table order; ``key_names``: the header of
    the key's columns (left-aligned), e.g. ("size", "setup")."""
    header = tuple(key_names) + ("trainable", "total", "compile+1st s", "median ms/step",
                                 "p10-p90 ms", "round medians", "CPU ms/step", "steps", "peak RSS MB",
                                 "loss first->last")
    rows = []
    for key, rounds in runs.items():
        res = best_round(rounds)
        if res is None:
            rows.append(key + ("-", "-", "-", "FAILED", "-", "failed", "-", "-", "-", "-"))
            continue
        note = f" ({res['skipped']} skipped)" if res["skipped"] else ""
        rows.append(key + (f"{res['trainable']:,}", f"{res['total']:,}",
                           f"{res['first_step_s']:.1f}", f"{res['median_ms']:.1f}",
                           f"{res['p10_ms']:.1f}-{res['p90_ms']:.1f}",
                           res["rounds_text"] + (" noisy" if res["noisy"] else ""),
                           f"{res['median_cpu_ms']:.1f}" if "median_cpu_ms" in res else "-",
                           f"{res['steps']}{note}", f"{res['peak_rss_mb']:.0f}",
                           f"{res['loss_first']:.3f}->{res['loss_last']:.3f}"))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(f"{{:{'<' if i < len(key_names) else '>'}{w}}}" for i, w in enumerate(widths))
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


def print_ratios(runs, goals, prefix_widths, name_width, note="", field="median_ms",
                 what="median step time"):
    """For each key prefix of ``runs`` (in table order) and each goal (numerator, denominator,
    bound or None[, the key parts it is for, e.g. sizes]) of ``goals`` whose two setups have a
    result, the ratio of their best rounds' ``field`` (``what`` in the heading) with a PASS/FAIL
    mark against the bound ("report" without one), ``(noisy)`` when either setup is. ``prefix_widths``: the width of each prefix
    column; ``name_width``: of the "numerator/denominator" column; ``note`` ends the heading.
    Returns the number of ratios printed."""
    best = {key: best_round(rounds) for key, rounds in runs.items()}
    median = {key: res[field] for key, res in best.items() if res is not None}
    noisy = {key for key, res in best.items() if res is not None and res["noisy"]}
    print(f"\nratios of {what} (goal: numerator <= bound x denominator{note})")
    shown = 0
    for prefix in dict.fromkeys(key[:-1] for key in runs):
        for goal in goals:
            num, den, bound = goal[:3]
            if len(goal) > 3 and not set(prefix) & set(goal[3]):  # a goal for some sizes only
                continue
            key_n, key_d = prefix + (num,), prefix + (den,)
            if key_n not in median or key_d not in median:
                continue
            ratio = median[key_n] / median[key_d]
            if bound is None:
                goal, mark = "no goal", "report"
            else:
                goal, mark = f"goal <= {bound:<4}", "PASS" if ratio <= bound else "FAIL"
            if {key_n, key_d} & noisy:
                mark += " (noisy)"
            columns = "".join(f"{part:<{width}} " for part, width in zip(prefix, prefix_widths))
            print(f"  {columns}{num + '/' + den:<{name_width}} {ratio:6.3f}   {goal:<13} {mark}")
            shown += 1
    return shown
