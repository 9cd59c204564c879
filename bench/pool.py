"""One over-seeds table from several results folders (bench.compare --out or freezeps report --out).

    python -m bench.pool --baseline ps-none --out docs/results/text-rt-full-seeds \
        docs/results/text-rt-full docs/results/text-rt-full-seed1 docs/results/text-rt-full-seed2

Long runs are made one seed per invocation (an invocation of the full Rotten Tomatoes pair
takes 35 minutes), so their seeds sit in separate folders. This reads each folder's
results.json, groups the runs by configuration (a run's name less its `-sN`), and writes
OUT/README.md: freezeps.report's over-seeds table, differences paired by seed. A configuration's
runs must have the same settings but for the seed (a different workload is refused), every
seed of a configuration needs a baseline run of that seed, and no (configuration, seed) may
come twice. FOLDER:CONFIG[,CONFIG...] takes only those configurations from a folder, e.g. a
freezing run from one folder and the baseline of the same seed from a later one (a folder whose
own baseline run is slower or was left unfinished). The date, machine and command of each run
are in its folder's README.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from bench.compare import FREEZE_SETTINGS, write_readme
from freezeps.report import seeds_markdown

# Settings that name a run rather than define it.
PER_RUN = ("seed", "run_dir")


def configuration(run_name: str) -> str:
    """The configuration a run belongs to: its name less bench.compare's `-sN` seed suffix."""
    return re.sub(r"-s\d+$", "", run_name)


def defining(config: dict) -> dict:
    """The settings that define a run: all but PER_RUN, and with `freeze` none, none of the freeze
    settings either (a none run made beside one freeze setting pools with one made beside another)."""
    ignored = FREEZE_SETTINGS if config.get("freeze") == "none" else ()
    return {k: v for k, v in config.items() if k not in PER_RUN and not k.startswith(ignored)}


def source(text: str) -> tuple[Path, frozenset[str] | None]:
    """A FOLDER or FOLDER:CONFIG[,CONFIG...] argument -> (folder, the configurations to take or None
    for all). A folder whose own name has a colon is taken whole."""
    folder, _, configs = text.rpartition(":")
    if not folder or "/" in configs or Path(text).is_dir():
        return Path(text), None
    return Path(folder), frozenset(c.strip() for c in configs.split(",") if c.strip())


def pool(sources: list[tuple[Path, frozenset[str] | None]]) -> dict[str, list[dict]]:
    """Configuration -> its runs from every folder's results.json, ordered by seed. A source is
    (folder, None) for all of a folder's runs, or (folder, configurations) for just those, each of
    which must have a run there."""
    groups: dict[str, dict[int, dict]] = {}
    settings: dict[str, dict] = {}
    for folder, wanted in sources:
        path = folder / "results.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no results.json (is it a bench.compare or freezeps report --out folder?)")
        runs = json.loads(path.read_text())
        if wanted is not None:
            present = {configuration(run["name"]) for run in runs}
            if not wanted:
                raise ValueError(f"{folder}: no configuration named after ':'")
            if wanted - present:
                raise ValueError(f"{folder}: no run of {', '.join(sorted(wanted - present))}"
                                 f" (it has {', '.join(sorted(present))})")
            runs = [run for run in runs if configuration(run["name"]) in wanted]
        for run in runs:
            name, seed = configuration(run["name"]), run["config"].get("seed")
            defined = defining(run["config"])
            if settings.setdefault(name, defined) != defined:
                differ = sorted(k for k in defined.keys() | settings[name].keys()
                                if defined.get(k) != settings[name].get(k))
                raise ValueError(f"{folder}: {run['name']} differs from other runs of {name} in {', '.join(differ)}")
            if seed in groups.setdefault(name, {}):
                raise ValueError(f"{folder}: {name} with seed {seed} comes twice")
            groups[name][seed] = run
    return {name: [runs[s] for s in sorted(runs)] for name, runs in groups.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", type=source, nargs="+", metavar="FOLDER[:CONFIG,...]",
                        help="bench.compare or freezeps report --out folders, each whole or only the configurations named")
    parser.add_argument("--baseline", required=True, help="the configuration differences are taken to")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    folders = [folder for folder, _ in args.sources]
    try:
        groups = pool(args.sources)
    except ValueError as error:
        parser.error(str(error))
    if args.baseline not in groups:
        raise SystemExit(f"no run of the baseline `{args.baseline}` in {', '.join(map(str, folders))}")
    groups = {args.baseline: groups.pop(args.baseline), **groups}
    text = [f"# {', '.join(groups)} over seeds", "", seeds_markdown(groups, args.baseline), "",
            "Runs from: " + ", ".join(f"[{f.name}]({Path(os.path.relpath(f, args.out)) / 'README.md'})"
                                  for f in folders) +
            " (each folder's README names its machine, date and command). "
            f"Pooled with `python -m bench.pool {' '.join(sys.argv[1:] if argv is None else argv)}`."]
    write_readme(args.out, text)


if __name__ == "__main__":
    main()
