"""``sgs-dgdd``: distil, evaluate and compare DM and DM+SGS under leave-one-domain-out.

    sgs-dgdd run --preset quick                       # DM and DM+SGS on one target, then a table
    sgs-dgdd run --preset paper --target sketch --seeds 0 1 2
    sgs-dgdd distill --config my.yaml --method dm_sgs --alpha 1 --beta 0
    sgs-dgdd evaluate --run-dir runs/X --method random herding dm dm_sgs
    sgs-dgdd run --preset medium --matching m3d --eval-arch convnet,alexnet:32,vgg11:16,resnet18:16
    sgs-dgdd run --preset medium --select-lr 0.5,1,2,4,8 --select-seeds 10   # lr_img per method, no target peeking
    sgs-dgdd show runs/X
    sgs-dgdd compare runs/photo runs/sketch --plot pairs.png               # paired differences, 95% CIs
    sgs-dgdd run --preset imagenette-128 --ipc 10 --data-root /data/imagenet --sketch-root /data/sketch \
        --imagenet-r-root /data/imagenet-r                                 # ImageNet subset, several OOD targets
    sgs-dgdd make-demo-imagenet demo/       # a small generated ImageNet-layout tree for --preset imagenette-cpu
    torchrun --nproc_per_node=8 -m sgs_cuda.cli run --preset imagenette-128 --data-root /data/imagenet  # 8 GPUs

Configuration: built-in defaults (the paper's), then ``--preset`` (``sgs_cuda/configs/*.yaml``),
then ``--config FILE`` (YAML or JSON), then the flags; ``--set section.key=value`` reaches any
option. With ``--resume`` the run folder's ``config.json`` is the starting point instead of the
defaults, so ``sgs-dgdd run --resume --run-dir R`` continues R exactly.

This module only parses arguments: the pipeline (run folders, reuse and resume, distillation,
evaluation) is the Python API of :mod:`sgs_cuda.experiment`, which also says what a run folder
holds; the configuration is :mod:`sgs_cuda.config`, the comparison :mod:`sgs_cuda.compare`.
User errors end in one line, ``sgs-dgdd: error: ...``, and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from . import compare, config, distributed, experiment, options
from ._io import RunFolderError
from .compare import format_table
from .config import available_presets
from .dm.loop import INITS
from .methods import method_help

# (flag attribute, config path) for the flags that map one-to-one onto an option.
FLAG_PATHS = [
    ("dataset", "dataset"), ("data_root", "data_root"), ("target", "target"), ("device", "device"),
    ("pseudo_domains", "pseudo_domains"),
    ("sketch_root", "data_kwargs.sketch_root"), ("imagenet_r_root", "data_kwargs.r_root"),
    ("imagenet_a_root", "data_kwargs.a_root"), ("imagenet_v2_root", "data_kwargs.v2_root"),
    ("resolution", "data_kwargs.resolution"), ("crop", "data_kwargs.crop"),
    ("decode_workers", "data_kwargs.num_workers"), ("train_per_class", "data_kwargs.train_per_class"),
    ("ipc", "distill.ipc"), ("iterations", "distill.iterations"), ("batch_real", "distill.batch_real"),
    ("lr_img", "distill.lr_img"), ("init", "distill.init"), ("width", "distill.width"),
    ("matching", "distill.matching"), ("checkpoint_every", "distill.checkpoint_every"),
    ("dam_weight", "distill.dam_weight"), ("dam_temperature", "distill.dam_temperature"),
    ("eval_epochs", "eval.epochs"), ("num_eval", "eval.num_eval"), ("eval_width", "eval.width"),
    ("eval_arch", "eval.arch"), ("label", "label"),
    ("select_seeds", "select.seeds"), ("holdout_fraction", "select.fraction"),
    ("select_validation", "select.validation"),
    *options.flag_paths(),  # the surgery's options: one flag per SGSConfig field
]


def overrides_from_args(args) -> dict:
    """The flags and ``--set`` items as ``{"section.key": value}``, in order of precedence."""
    out = {}
    for attr, path in FLAG_PATHS:
        value = getattr(args, attr, None)
        if value is not None:
            out[path] = value
    if getattr(args, "method", None):
        out["methods"] = args.method
    if getattr(args, "seeds", None):
        out["seeds"] = args.seeds
    if getattr(args, "dsa", None) is not None:
        out["distill.dsa"] = out["eval.dsa"] = args.dsa
    if getattr(args, "progress", None) is not None:
        out["progress"] = args.progress
    if getattr(args, "select_lr", None) is not None:
        out["select.lr_grid"] = config.parse_grid(args.select_lr)
    for item in getattr(args, "data_option", None) or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"--data-option expects KEY=VALUE (e.g. cache_dir=/fast/disk), got {item!r}")
        key, value = config.parse_assignment(item)
        out.pop(f"data_kwargs.{key}", None)
        out[f"data_kwargs.{key}"] = value
    for item in getattr(args, "set", None) or []:
        key, value = config.parse_assignment(item)
        out.pop(key, None)  # re-insert: --set comes last
        out[key] = value
    return out


def resolve_config(args, saved: dict | None = None) -> dict:
    """defaults (or a resumed run's saved config) <- --preset <- --config <- flags <- --set."""
    return config.resolve_config(overrides_from_args(args), preset=getattr(args, "preset", None),
                                 config_file=getattr(args, "config", None), saved=saved)


# --- commands -------------------------------------------------------------------------------

def _experiment(args, need_run_dir_config: bool = False) -> experiment.Experiment:
    run_dir = Path(args.run_dir) if getattr(args, "run_dir", None) else None
    saved = None
    if run_dir is not None and (args.resume or need_run_dir_config):  # under torchrun rank 0 reads it
        world, _ = distributed.init_from_env(getattr(args, "device", None) or "auto")
        saved = world.on_main(lambda: config.load_saved_config(run_dir, required=need_run_dir_config))
    cfg = resolve_config(args, saved)
    return experiment.Experiment(cfg, run_dir, resume=args.resume, preset=getattr(args, "preset", None))


def cmd_distill(args) -> int:
    _experiment(args).produce_sets()
    return 0


def cmd_run(args) -> int:
    exp = _experiment(args)
    metrics = exp.run()
    print(format_table(metrics))
    print(f"run folder: {exp.run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    metrics = _experiment(args, need_run_dir_config=True).run(distil=False)
    print(format_table(metrics))
    return 0


def cmd_show(args) -> int:
    print(compare.describe_run(compare.load_run(args.run_dir)))
    return 0


def cmd_select_lr(args) -> int:
    print(compare.format_selection(_experiment(args).select_all()))
    return 0


def cmd_make_demo(args) -> int:
    from .data.demo_tree import describe, make_demo_imagenet

    print(describe(make_demo_imagenet(args.dir, train_per_class=args.train_per_class), args.dir))
    return 0


def cmd_self_check(args) -> int:
    from . import selfcheck
    return selfcheck.main()


def cmd_compare(args) -> int:
    result = compare.compare_runs(args.run_dirs, baseline=args.baseline, arms=args.arms,
                                  confidence=args.confidence, plot=args.plot)
    print(result["markdown"])
    if args.json:
        compare.write_comparison(result, args.json)
    return 0


# --- argument parsing -----------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    from .data.registry import names as dataset_names
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", help=f"named configuration ({', '.join(available_presets())})")
    g.add_argument("--config", help="YAML or JSON config file (overrides the preset)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any option, e.g. --set distill.momentum=0.9 (repeatable; overrides everything)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"dataset name ({', '.join(dataset_names())}) or folder")
    g.add_argument("--data-root", help="where the dataset lives (ImageNet: the folder holding train/ and val/)")
    g.add_argument("--target", help="the unseen target domain (default: the first domain); ImageNet subsets: "
                                    "default every OOD set given, or a comma-separated choice of them")
    g.add_argument("--pseudo-domains", type=int, metavar="K",
                   help="distil from K >= 2 pseudo-domains clustered from the pooled source domains "
                        "(needed by DM+SGS on ImageNet, which has one training domain; 0: none)")
    g.add_argument("--sketch-root", metavar="DIR", help="ImageNet-Sketch (<wnid>/ folders): an OOD target")
    g.add_argument("--imagenet-r-root", metavar="DIR", help="ImageNet-R (<wnid>/ folders, 200 classes): an OOD target")
    g.add_argument("--imagenet-a-root", metavar="DIR", help="ImageNet-A (<wnid>/ folders, 200 classes): an OOD target")
    g.add_argument("--imagenet-v2-root", metavar="DIR", help="ImageNet-V2 (class-index folders 0..999): an OOD target")
    g.add_argument("--resolution", type=int, choices=[32, 64, 128, 256],
                   help="image side of folder and ImageNet sources, decoded once into the cache")
    g.add_argument("--crop", choices=["center", "squash"],
                   help="center: shorter side resized, centre crop (ImageNet default); squash: whole image resized")
    g.add_argument("--decode-workers", type=int, metavar="N", help="threads decoding images into the cache")
    g.add_argument("--train-per-class", type=int, metavar="N",
                   help="ImageNet: use N training images per class (a seeded choice; default all)")
    g.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                   help="any other keyword of the data source, e.g. cache_dir=/fast/disk (repeatable)")
    g = p.add_argument_group("distillation")
    g.add_argument("--method", nargs="+", help=f"any of the methods ({method_help()})")
    g.add_argument("--seeds", nargs="+", type=int, help="seeds (one run per method and seed)")
    g.add_argument("--ipc", type=int, help="images per class")
    g.add_argument("--iterations", type=int)
    g.add_argument("--batch-real", type=int, help="real images per class and iteration (split over domains)")
    g.add_argument("--lr-img", type=float)
    g.add_argument("--init", choices=list(INITS),
                   help="real images, noise, or real images with the class's cross-domain amplitude spectrum "
                        "(spectral: mean over the source domains, spectral_min: minimum)")
    g.add_argument("--width", type=int, help="width of the embedding ConvNet")
    g.add_argument("--matching", choices=["dm", "m3d"],
                   help="dm: feature means (DM); m3d: Gaussian-kernel MMD (M3D), in DM units")
    g.add_argument("--dam-weight", type=float,
                   help="dm_dam: weight of the domain views' matching loss (default 1)")
    g.add_argument("--dam-temperature", type=float,
                   help="dm_dam: softmax temperature of the per-domain mask logits (default 0.1)")
    g.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=None,
                   help="differentiable Siamese augmentation (distillation and evaluation)")
    g = p.add_argument_group("spectral gradient surgery (sgs_cuda.options.SGSConfig)")
    options.add_arguments(g)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-epochs", type=int)
    g.add_argument("--num-eval", type=int, help="evaluation networks per synthetic set")
    g.add_argument("--eval-width", type=int, help="width of the evaluation ConvNet")
    g.add_argument("--eval-arch", metavar="ARCHS",
                   help="evaluation networks, comma-separated, each optionally name:width "
                        "(convnet, alexnet, vgg11, resnet18; e.g. convnet,alexnet:32,vgg11:16,resnet18:16)")
    g = p.add_argument_group("lr_img selection (source-domain validation: the target is never read)")
    g.add_argument("--select-lr", metavar="GRID",
                   help="pick lr_img per method from this grid (e.g. 0.5,1,2,4,8) on held-out source images")
    g.add_argument("--select-seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds of the selection's distillations (default 10; keep them apart from --seeds)")
    g.add_argument("--holdout-fraction", type=float, help="share of each source domain held out (default 0.2)")
    g.add_argument("--select-validation", choices=list(config.VALIDATIONS),
                   help="images: held-out images of the source domains (default); domain: each source domain "
                        "left out in turn (one distillation per source: it does not reward a source-only cue)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="auto (cuda when available), cpu, cuda or cuda:N")
    g.add_argument("--run-dir", help="output folder (default: runs/<dataset>-<target>-<preset>)")
    g.add_argument("--resume", action="store_true", help="continue the run folder's checkpoints and results")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N iterations (0: never)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    g.add_argument("--label", help="name of this run's arm in `sgs-dgdd compare` (default: from the settings)")


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    parser = argparse.ArgumentParser(
        prog="sgs-dgdd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil, evaluate and compare DM and DM+SGS under leave-one-domain-out.",
        epilog=f"examples:\n{examples}\n\nsee `sgs-dgdd run --help` for every option")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "distil and evaluate, then print the comparison"),
                             ("distill", cmd_distill, "distil synthetic sets only"),
                             ("evaluate", cmd_evaluate, "evaluate the sets of a run folder (and baselines)"),
                             ("select-lr", cmd_select_lr, "pick lr_img per method on held-out source images only")):
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
        p.set_defaults(func=func)
    text = ("write a small ImageNet-layout tree of generated JPEGs (train/val, Sketch, R, V2) "
            "for --preset imagenette-cpu")
    p = sub.add_parser("make-demo-imagenet", help=text, description=text)
    p.add_argument("dir", metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--train-per-class", type=int, default=12, metavar="N", help="training images per class")
    p.set_defaults(func=cmd_make_demo)
    text = "check every CUDA path against the float64 reference now, one line per path and size"
    p = sub.add_parser("self-check", help=text, description=text + " (exit status 1 when one fails)")
    p.set_defaults(func=cmd_self_check)
    p = sub.add_parser("show", help="print a run folder's metrics")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_show)
    text = "paired comparison of run folders: per target and pooled, 95% CIs, positive pairs"
    p = sub.add_parser("compare", help=text.replace("%", "%%"), description=text + ". Each evaluated method of each folder is an "
                       "arm, named by the folder's --label or its settings (DM, DM+SGS, M3D, ...); arms span folders.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--baseline", help="the arm the others are compared with (default: DM, else the first)")
    p.add_argument("--arms", nargs="+", metavar="NAME", help="only these arms, in this order")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--plot", metavar="PNG", help="write the per-seed pairs plot of OOD accuracy")
    p.add_argument("--json", metavar="PATH", help="write the accuracies and paired statistics as JSON")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate" and not args.run_dir:
        build_parser().error("evaluate needs --run-dir (the folder written by `distill` or `run`)")
    # under torchrun (sgs_cuda.distributed) every process runs the command; rank 0 alone prints
    quiet = distributed.launched_by_torchrun() and os.environ.get("RANK", "0") != "0"
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RunFolderError,
            distributed.RankFailure) as exc:  # user errors (or another rank's): one line
        if not quiet:
            print(f"sgs-dgdd: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
