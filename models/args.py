"""Argument parsers of the model commands (train, pseudo-label, prune, export), in the manner of
torchvision's references: one parser per command, built from parent parsers for the flags
that several commands share, so that a flag of another command is an error.

Each command module's ``get_args_parser`` returns its parser from here. Kept free of torch
imports so that `tagstream --help` stays fast.
"""

from __future__ import annotations

import argparse

DATA_HELP = "ImageFolder root: class folders, or train/ val/ test/ each holding class folders"


def output_dir_parser(command: str) -> argparse.ArgumentParser:
    """--output-dir (every command), defaulting to ``runs/<command>``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--output-dir",
        default=f"runs/{command}",
        help=f"where checkpoints, reports and models go (default: runs/{command})",
    )
    return parser


def checkpoint_data_parser(whose: str) -> argparse.ArgumentParser:
    """--data of the commands that start from a checkpoint (pseudo-label, prune, export):
    the checkpoint's own data by default, with its own splits."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--data",
        default=None,
        help=f"{DATA_HELP}, split as {whose} was (default: the data {whose} was trained on)",
    )
    return parser


def optimizer_parser() -> argparse.ArgumentParser:
    """Batch size and SGD settings: every command that trains (train, pseudo-label, prune)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default: 0.01)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    return parser


def training_parser() -> argparse.ArgumentParser:
    """What a `train` run takes beyond its data: train, and pseudo-label for its student."""
    parser = argparse.ArgumentParser(add_help=False, parents=[optimizer_parser()])
    parser.add_argument(
        "--weights",
        default="none",
        help="imagenet, PATH of a state dict, or none for random initialization (default: none)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument(
        "--opt",
        choices=["sgd", "adamw"],
        default="sgd",
        help="optimizer (default: sgd, as the ELEN 6889 report's training)",
    )
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="(default: 0.0)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (default: 0)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def finetune_parser(*, epochs_help: str, lr_default: str) -> argparse.ArgumentParser:
    """--finetune-epochs and --finetune-lr: pseudo-label (the student on the clean set) and
    prune (after each round)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        help=f"fine-tune epochs: {epochs_help} (default: 1)",
    )
    parser.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help=f"peak learning rate of the fine-tune (default: {lr_default})",
    )
    return parser


def train_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`tagstream train`."""
    parser = argparse.ArgumentParser(
        description="fine-tune ResNet50 on an ImageFolder",
        add_help=add_help,
        parents=[output_dir_parser("train"), training_parser()],
    )
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument(
        "--input-size", type=int, default=224, help="model input edge (default: 224)"
    )
    parser.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter side before the centre crop at eval (default: input size)",
    )
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
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (default: none)")
    return parser


def pseudo_label_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`tagstream pseudo-label`: the student trains like `train` (its flags), on the teacher's
    input size, splits and seed."""
    parser = argparse.ArgumentParser(
        description="teacher/student: label unlabeled images with a teacher, train a student "
        "on them",
        add_help=add_help,
        parents=[
            output_dir_parser("pseudo-label"),
            checkpoint_data_parser("the teacher"),
            training_parser(),
            finetune_parser(
                epochs_help="of the student on the clean set",
                lr_default="a tenth of --lr",
            ),
        ],
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (from train)")
    parser.add_argument("--unlabeled", required=True, help="folder of unlabeled images")
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
    return parser


def prune_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`tagstream prune`."""
    parser = argparse.ArgumentParser(
        description="iterative APoZ pruning with fine-tuning, and its report",
        add_help=add_help,
        parents=[
            output_dir_parser("prune"),
            checkpoint_data_parser("the checkpoint"),
            optimizer_parser(),
            finetune_parser(epochs_help="after each pruning round", lr_default="--lr"),
        ],
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint to prune")
    parser.add_argument("--rounds", type=int, default=1, help="pruning rounds (default: 1)")
    parser.add_argument(
        "--prune-rule",
        choices=["mean+std", "top-fraction"],
        default="mean+std",
        help="which channels go (default: mean+std, as in the ELEN 6889 report)",
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


def export_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`tagstream export`."""
    parser = argparse.ArgumentParser(
        description="export a checkpoint to ONNX (fp32, fp16, int8) with its manifest",
        add_help=add_help,
        parents=[output_dir_parser("export"), checkpoint_data_parser("the checkpoint")],
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint to export")
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="exported precision (default: fp32)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help="training images that calibrate INT8 (default: 256)",
    )
    return parser
