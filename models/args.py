"""One argument parser for the model commands (train, pseudo-label, prune, export), as in
torchvision's references.

Kept free of torch imports so that `tagstream --help` stays fast.
"""

from __future__ import annotations

import argparse


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="tagstream model training and export", add_help=add_help
    )
    parser.add_argument(
        "--data",
        default=None,
        help="ImageFolder root: class folders, or "
        "train/ val/ test/ each holding class folders (default: none)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where checkpoints, reports and models go (default: runs/<command>)",
    )
    parser.add_argument(
        "--weights",
        default="none",
        help="imagenet, PATH of a state dict, or none for random initialization (default: none)",
    )
    parser.add_argument(
        "--input-size", type=int, default=224, help="model input edge (default: 224)"
    )
    parser.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter side before the centre crop at eval (default: input size)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument(
        "--opt",
        choices=["sgd", "adamw"],
        default="sgd",
        help="optimizer (default: sgd, as the seed)",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default: 0.01)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="(default: 0.0)")
    parser.add_argument(
        "--val-split",
        type=float,
        default=0.15,
        help="share held out for validation when DATA has no val/ (default: 0.15)",
    )
    parser.add_argument(
        "--test-split",
        type=float,
        default=0.15,
        help="share held out for test when DATA has no test/ (default: 0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and init seed (default: 0)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (default: 0)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # export
    parser.add_argument("--checkpoint", default=None, help="checkpoint to export (export only)")
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="exported precision (export only; default: fp32)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help="training images that calibrate INT8 (default: 256)",
    )
    # pseudo-label
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (pseudo-label only)")
    parser.add_argument(
        "--unlabeled", default=None, help="folder of unlabeled images (pseudo-label only)"
    )
    parser.add_argument(
        "--top-k", type=int, default=500, help="images kept per class (default: 500)"
    )
    parser.add_argument(
        "--top-p",
        type=int,
        default=1,
        help="classes each image may be selected for, its most probable ones; above 1 it "
        "matters only with --min-confidence below 0.5 (default: 1)",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.5,
        help="teacher probability an image needs to be selected (default: 0.5)",
    )
    parser.add_argument(
        "--select-only",
        action="store_true",
        help="write the pseudo-labelled ImageFolder and stop (default: also train the student)",
    )
    # prune
    parser.add_argument("--rounds", type=int, default=1, help="pruning rounds (default: 1)")
    parser.add_argument(
        "--prune-rule",
        choices=["mean+std", "top-fraction"],
        default="mean+std",
        help="which channels go (default: mean+std, as the seed)",
    )
    parser.add_argument(
        "--prune-k", type=float, default=1.0, help="mean+k*std threshold on APoZ (default: 1.0)"
    )
    parser.add_argument(
        "--prune-fraction",
        type=float,
        default=0.1,
        help="share removed per round with top-fraction (default: 0.1)",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        help="fine-tune epochs: after each pruning round, or of the student on the clean "
        "set (default: 1)",
    )
    parser.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="peak learning rate of the fine-tune (default: --lr for prune, a tenth of it "
        "for the student on the clean set)",
    )
    parser.add_argument(
        "--distill",
        action="store_true",
        help="fine-tune distilled from the unpruned model (default: off)",
    )
    parser.add_argument(
        "--bench-input-size",
        type=int,
        default=224,
        help="input edge for the report's MACs and throughput; at small sizes fixed costs "
        "hide what pruning saves (default: 224, the serving size)",
    )
    return parser
