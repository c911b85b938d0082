"""The `defectbench` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml
from tabulate import tabulate

from harness.errors import DefectBenchError
from harness.io import NO_SPACE, no_space
from harness.metrics.iclpips_presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = lambda message, category, *rest, **kw: f"defectbench: warning: {message}\n"
    warnings.filterwarnings("ignore", message=".*'pretrained' is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Arguments other than a weight enum.*")
    try:
        return args.func(args) or 0
    except (DefectBenchError, FileExistsError) as err:
        print(f"defectbench: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a read-only results folder, a full disk: one line naming the file, not a traceback
        if err.errno in NO_SPACE:
            print(f"defectbench: error: {no_space(err.filename or Path.cwd() / '?')}", file=sys.stderr)
            return 2
        if not err.filename:
            raise  # not about a file: a bug or a library's own failure, with its traceback
        print(f"defectbench: error: {err.filename}: {err.strerror or err} (could not read or write)", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectbench", description="Few-shot industrial defect generation benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic data set (MVTec AD / LOCO / Caption layouts)")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-defect", type=int, default=15, help="images per defect type")
    p.add_argument("--n-test-good", type=int, default=12)
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="list categories, defect types and counts, and every problem found")
    p.add_argument("root", type=Path)
    _data_options(p, category_required=False)
    p.add_argument("--no-verify", action="store_true", help="read headers only, do not decode every file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("split", help="apply a split protocol to a category and write its manifest")
    p.add_argument("root", type=Path)
    _data_options(p)
    p.add_argument("--protocol", default="clean-thirds")
    p.add_argument("--out", type=Path, default=None, help="manifest path (default results/splits/...)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("methods", help="list the available methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", help="fit a method on a category's training part and generate defects")
    p.add_argument("--method", required=True)
    p.add_argument("--data", type=Path, required=True, help="data set root (the folder holding category folders)")
    _data_options(p)
    p.add_argument("--defect", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--protocol", default="clean-thirds")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method setting (YAML value), e.g. --set blend=poisson")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--backbone", type=Path, default=None,
                   help="diffusion backbone folder (diffusers layout) for methods that fine-tune one; default: the "
                        "shipped tiny backbone (fine-tuned first on this category's normal images where it has not "
                        "seen them; cached), or SD 1.5 in 'paper'")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="score a folder of generated images")
    p.add_argument("generated", type=Path)
    p.add_argument("--real", type=Path, help="folder of real images: the FID/KID reference")
    p.add_argument("--centres", type=Path, help="folder of the generator-training anomalies (IC-LPIPS centres)")
    p.add_argument("--data", type=Path, help="instead of --real/--centres: a data set root ...")
    _data_options(p, category_required=False)
    p.add_argument("--defect", help="... with --category and --defect: the split's test part and centres")
    p.add_argument("--protocol", default="clean-thirds")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--ic-lpips", default="ic_lpips", choices=PRESETS.names(),
                   help="IC-LPIPS variant (also the LPIPS network of LPIPS-real and BG-LPIPS): DualAnoDiff (vgg, "
                        "256 px, 50 per cluster), DFMGAN's code (alex, 200, centres unscaled as in its code), DFMGAN's "
                        "rule with the centres scaled, or DualAnoDiff's rule with alex at the images' size (cheap)")
    p.add_argument("--json", type=Path, help="also write the values (with details) to this JSON file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("run", help="run a suite (suites/<name>.yaml or a path): plan, execute, resume, summarise")
    p.add_argument("suite")
    p.add_argument("--dry-run", action="store_true", help="print the job graph and its size; run nothing")
    p.add_argument("--executor", choices=["ray", "serial"], help="override the suite's executor")
    p.add_argument("--address", help="an existing Ray cluster (e.g. 127.0.0.1:6379)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    p.add_argument("--data", help="the data root for ${DATA} in the suite (or set DATA)")
    p.add_argument("--results", type=Path, help="results folder (default results/, or $DEFECTBENCH_RESULTS)")
    p.add_argument("--fresh", action="store_true", help="recompute every job instead of resuming")
    p.add_argument("--no-leaderboard", action="store_true", help="do not render the leaderboard at the end")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reported", help="the papers' tables in results/reported: printed averages against their rows")
    p.add_argument("--all", action="store_true", help="list every printed average, not only those that disagree")
    p.set_defaults(func=cmd_reported)

    p = sub.add_parser("leaderboard", help="render results/leaderboard/<suite>.md and .tex from the records")
    p.add_argument("suite", nargs="?", help="default: every suite with a run")
    p.add_argument("--results", type=Path, help="results folder (default results/, or $DEFECTBENCH_RESULTS)")
    p.add_argument("--no-reported", action="store_true", help="leave out the numbers the papers report")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("export", help="per-image values of a run as CSV and JSONL, one pair of files per job")
    p.add_argument("run", help="a suite (its latest run) or SUITE/RUN_ID")
    p.add_argument("--results", type=Path, help="results folder (default results/, or $DEFECTBENCH_RESULTS)")
    p.add_argument("--out", type=Path, help="default: results/exports/SUITE/RUN_ID")
    p.add_argument("--kinds", nargs="+", default=["score", "segment", "detect"], choices=["score", "segment", "detect"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("backbone", help="the shipped tiny backbone: train it, measure it, render its card")
    backbone = p.add_subparsers(dest="action", required=True)
    q = backbone.add_parser("train", help="train it from the recipe in harness/diffusion/shipped.py (resumable)")
    q.add_argument("--out", type=Path, default=None, help="default: backbones/defectbench-tiny")
    q.set_defaults(func=cmd_backbone_train)
    q = backbone.add_parser("measure", help="measure it (and the per-run backbone of before) and draw its sample grid")
    q.add_argument("--folder", type=Path, default=None, help="default: backbones/defectbench-tiny")
    q.add_argument("--no-baseline", action="store_true", help="leave out the per-run backbone of before")
    q.add_argument("--samples", type=int, default=64, help="samples per category from pure noise (KID)")
    q.set_defaults(func=cmd_backbone_measure)
    q = backbone.add_parser("card", help="render its README.md from training.json, corpus.json and measures.json")
    q.add_argument("--folder", type=Path, default=None, help="default: backbones/defectbench-tiny")
    q.set_defaults(func=cmd_backbone_card)
    return parser


def _data_options(p: argparse.ArgumentParser, category_required: bool = True) -> None:
    p.add_argument("--category", required=category_required)
    p.add_argument("--captions", type=Path, default=None, help="MVTec Caption JSON {category: {defect: [captions]}}")


def cmd_synth(args) -> int:
    from harness.data.synth import CATEGORIES, SynthConfig, synthesize

    config = SynthConfig(seed=args.seed, size=args.size, n_train=args.n_train, n_defect=args.n_defect,
                         n_test_good=args.n_test_good, categories=tuple(args.categories or CATEGORIES))
    synthesize(args.out, config, overwrite=args.overwrite)
    print(f"wrote {len(config.categories)} categories to {args.out} (seed {args.seed}, {args.size} px)")
    return 0


def cmd_inspect(args) -> int:
    from harness.inspection import inspect_dataset

    result = inspect_dataset(args.root, args.captions, [args.category] if args.category else None, not args.no_verify)
    print(tabulate(result.rows(), headers="keys", tablefmt="simple"))
    for warning in result.warnings:
        print(f"warning: {warning}")
    for error in result.errors:
        print(f"problem: {error}")
    print(f"{len(result.categories)} categories, {len(result.errors)} problems, {len(result.warnings)} warnings")
    return 1 if result.errors else 0


def _read(args, root: Path, require_captions: bool = False):
    from harness.data.layouts import read_category

    return read_category(root, args.category, captions=args.captions, require_captions=require_captions)


def cmd_split(args) -> int:
    from harness.data.splits import make_splits, write_manifests
    from harness.paths import RESULTS_DIR

    category = _read(args, args.root)
    splits = make_splits(category, args.protocol)
    rows = []
    for split in splits:
        for defect, parts in split.defects.items():
            rows.append({"fold": split.fold, "defect type": defect, "N": len(category.defects[defect]),
                         "train": len(parts.train), "test": len(parts.test), "centres": len(parts.centres),
                         "in both": len(split.overlap(defect))})
    print(tabulate(rows, headers="keys", tablefmt="simple"))
    for warning in dict.fromkeys(w for split in splits for w in split.warnings()):
        print(f"warning: {warning}")
    out = args.out or RESULTS_DIR / "splits" / category.dataset / category.name / f"{args.protocol}.json"
    write_manifests(splits, out)
    first = splits[0]
    print(f"normal: train {len(first.normal_train)}, validation {len(first.normal_validation)}, test {len(first.normal_test)}")
    print(f"manifest: {out}\nhash: {json.loads(out.read_text())['hash']}")
    return 0


def cmd_methods(args) -> int:
    from harness.methods import discover

    rows, broken = [], []
    for name, info in discover().items():
        if info.ok:
            paper = info.cls.paper + (f" [in progress, not in 'methods: all': {info.cls.in_progress}]"
                                      if info.cls.in_progress else "")
            rows.append([name, info.cls.granularity, ", ".join(sorted(info.cls.needs)) or "-", paper])
        else:
            rows.append([name, "BROKEN", "-", info.error.splitlines()[0]])
            broken.append(info)
    print(tabulate(rows, headers=["method", "granularity", "needs", "paper"], tablefmt="simple", maxcolwidths=[None, None, None, 70]))
    for info in broken:
        print(f"\nmethod {info.name!r} ({info.directory}) is broken:\n{info.error}")
    return 1 if broken else 0


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise DefectBenchError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return out


def cmd_generate(args) -> int:
    from harness.data.splits import make_split
    from harness.generation import fit_method, generate_to
    from harness.methods import load_method
    from harness.tasks import build_task

    from harness.runner.suite import MAX_PER_DEFECT

    if not 1 <= args.n <= MAX_PER_DEFECT:
        raise DefectBenchError(f"--n must be a number of images from 1 to {MAX_PER_DEFECT}, not {args.n}")
    if args.seed < 0 or args.fold < 0:
        raise DefectBenchError(f"--seed and --fold must be >= 0 (got {args.seed}, {args.fold})")
    if args.out.exists() and not args.overwrite:
        raise DefectBenchError(f"{args.out}: already exists (pass --overwrite to replace it)")
    method = load_method(args.method, args.profile, _overrides(args.overrides))
    category = _read(args, args.data, require_captions="caption" in method.needs)
    split = make_split(category, args.protocol, args.fold)
    defects = category.defect_types if method.granularity == "category" else [args.defect]
    task = build_task(split, defects, method.working_resolution(method.profile.resolution), args.seed)
    if method.uses_backbone:
        task.backbone = args.backbone or _backbone_for(split, method.profile, method.backbone)
    workdir = args.out.parent / f".{args.out.name}.fit"
    seconds = fit_method(method, task, workdir)
    generate_to(method, task, args.defect, args.n, args.seed, args.out, workdir, overwrite=args.overwrite,
                resolution=method.profile.resolution,
                meta={"split": split.manifest_hash, "protocol": args.protocol, "fold": args.fold,
                      "data": str(args.data), "fit_seconds": round(seconds, 3)})
    print(f"{args.n} samples of {args.category}/{args.defect} by {args.method} in {args.out} "
          f"(images/, masks/, samples.jsonl; fit in {seconds:.1f}s, work folder {workdir})")
    return 0


def _backbone_for(split, profile, name: str | None) -> Path:
    from harness.diffusion import provision
    from harness.io import cached_file_hash

    paths = tuple(s.image for s in split.normal_train)
    normals = [provision.NormalImages(split.category.name, paths, tuple(cached_file_hash(p) for p in paths))]
    folder, info = provision.provision(profile, normals, progress=True, name=name)
    print(f"diffusion backbone: {folder} ({'reused' if info['reused'] else 'fine-tuned now'})")
    return folder


def cmd_score(args) -> int:
    from harness.data.splits import make_split
    from harness.metrics.score import ScoreConfig, Scorer, ScoreInputs, images_in
    from harness.metrics.specs import format_value, label

    if args.data:
        if not (args.category and args.defect):
            raise DefectBenchError("score --data needs --category and --defect")
        split = make_split(_read(args, args.data), args.protocol, args.fold)
        if args.defect not in split.defects:
            raise DefectBenchError(f"no defect type {args.defect!r} in {args.category}; known: {', '.join(split.defects)}")
        real = [s.image for s in split.defects[args.defect].test]
        centres = [s.image for s in split.defects[args.defect].centres]
    else:
        if not args.real:
            raise DefectBenchError("score needs --real DIR (or --data ROOT --category C --defect D)")
        real = images_in(_existing(args.real))
        centres = images_in(_existing(args.centres)) if args.centres else []
    if not _existing(args.generated).is_dir():
        raise DefectBenchError(f"{args.generated}: not a folder")
    scorer = Scorer(args.profile, ScoreConfig.for_profile(args.profile, ic_lpips=PRESETS[args.ic_lpips]))
    inputs = ScoreInputs.from_folder(args.generated, real, centres)
    values = scorer.score(inputs, progress=True)
    rows = [[label(v.metric), "—" if v.value is None else format_value(v.value, v.metric),
             "" if v.std is None else format_value(v.std, v.metric), v.n,
             v.missing or ("below the documented minimum of reference images" if v.below_minimum else "")]
            for v in values]
    print(tabulate(rows, headers=["metric", "value", "std", "n", "note"], tablefmt="simple", disable_numparse=True))
    if any(v.details.get("random") for v in values):
        print("note: some feature extractors had random weights (no pretrained weights found); see --json details")
    if args.json:
        from harness.io import atomic_write_json

        atomic_write_json(args.json, [v.as_dict() for v in values])
    return 0


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DefectBenchError(f"{path}: no such folder")
    return path


def cmd_run(args) -> int:
    from harness.runner.plan import expand, prepare
    from harness.report.summary import summary
    from harness.runner.run import dry_run, run_suite
    from harness.runner.suite import load_suite

    if args.results:
        os.environ["DEFECTBENCH_RESULTS"] = str(args.results)
    suite = load_suite(args.suite, data=args.data)
    if args.dry_run:
        from harness import weights

        with weights.no_downloads() as pending:  # a dry run downloads nothing
            plan = prepare(suite)
            expand(plan)
        print(dry_run(plan, pending))
        return 0
    result = run_suite(suite, executor=args.executor, address=args.address, num_cpus=args.num_cpus,
                       results=args.results, fresh=args.fresh)
    print(summary(result))
    if not args.no_leaderboard:
        from harness.report.leaderboard import render_leaderboard

        md, tex = render_leaderboard(suite.name, args.results)
        print(f"leaderboard: {md} and {tex}")
    return 1 if result.failed else 0


def cmd_backbone_train(args) -> int:
    from harness.diffusion import shipped

    folder = shipped.train(args.out or shipped.SHIPPED)
    print(f"trained: {folder}")
    return 0


def cmd_backbone_measure(args) -> int:
    from harness.diffusion import measure, shipped

    folder = args.folder or shipped.SHIPPED
    measure.measure_folder(folder, baseline=not args.no_baseline, n_samples=args.samples)
    print(f"measured: {folder / shipped.MEASURES_FILE}; card: {shipped.render_card(folder)}")
    return 0


def cmd_backbone_card(args) -> int:
    from harness.diffusion import shipped

    print(f"card: {shipped.render_card(args.folder or shipped.SHIPPED)}")
    return 0


def cmd_reported(args) -> int:
    from harness.report.leaderboard import REPORTED_DIR
    from harness.report.reported import check_averages, load_reported

    entries = load_reported(REPORTED_DIR)
    checks = check_averages(entries)
    shown = [c for c in checks if args.all or c.differs]
    rows = [[c.file, c.method, c.key, c.metric, c.printed, "—" if c.mean is None else round(c.mean, c.decimals + 2),
             c.n_rows, "beyond rounding" if c.beyond_rounding else "rounding" if c.differs else ""] for c in shown]
    print(tabulate(rows, headers=["table", "method", "row", "metric", "printed", "mean of rows", "rows", "differs"],
                   tablefmt="simple"))
    checkable = [c for c in checks if c.checkable]
    print(f"{len(entries)} tables, {len(checks)} printed averages, {len(checkable)} with every averaged row printed: "
          f"{sum(c.differs for c in checks)} differ from the mean of their rows, "
          f"{sum(c.beyond_rounding for c in checks)} by more than rounding")
    return 0


def cmd_leaderboard(args) -> int:
    from harness.report.leaderboard import render_leaderboard
    from harness.runner.store import runs_root

    if args.results:
        os.environ["DEFECTBENCH_RESULTS"] = str(args.results)
    root = runs_root(args.results)
    suites = [args.suite] if args.suite else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not suites:
        raise DefectBenchError(f"no runs under {root}; run a suite first (defectbench run smoke)")
    for suite in suites:
        md, tex = render_leaderboard(suite, args.results, show_reported=not args.no_reported)
        print(f"{suite}: {md} and {tex}")
    return 0


def cmd_export(args) -> int:
    from harness.results import export_per_image

    suite, _, run = args.run.partition("/")
    summary, out, without = export_per_image(suite, run or None, args.results, args.out, tuple(args.kinds))
    print(tabulate(summary, headers="keys", tablefmt="simple"))
    for job in without:
        print(f"not exported (finished before score jobs wrote per-image files: remove its folder and "
              f"`defectbench run {suite}` redoes that job alone): {job}")
    print(f"wrote {sum(r['jobs'] for r in summary)} jobs' CSV and JSONL files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
