"""`trl-dpo-plus`: the command line, shaped like `trl dpo`.

    trl-dpo-plus train --dataset_name pairs.jsonl --loss_type simpo --qlora --output_dir out   (TRL's flags, plus ours)
    trl-dpo-plus train --config recipe.yaml
    trl-dpo-plus losses                      the registry: names, reference-free, defaults, papers
    trl-dpo-plus demo [--losses sigmoid simpo ...]
    trl-dpo-plus run my_trl_dpo_script.py --loss_type simpo ...   an unchanged TRL script with our trainer
"""

from __future__ import annotations

import argparse
import difflib
import sys

COMMANDS = ("train", "losses", "demo", "run")


def make_train_parser(prog: str = "trl-dpo-plus train"):
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import DPOPlusConfig
    from .losses import list_losses

    parser = TrlParser((ScriptArguments, DPOPlusConfig, ModelConfig), prog=prog)
    for action in parser._actions:  # choices from the registry as it is now (plugins included)
        if action.dest == "loss_type":
            action.choices = list_losses()
    return parser


def train(argv: list[str]) -> int:
    from trl import get_peft_config, get_quantization_config

    from .assets import default_model_path
    from .data import check_preference_dataset, load_preference_dataset
    from .qlora import lora_defaults
    from .trainer import DPOPlusTrainer

    parser = make_train_parser()
    script_args, training_args, model_args, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    if unknown:
        flags = [a for a in unknown if a.startswith("-")]
        known = [o for action in parser._actions for o in action.option_strings]
        close = difflib.get_close_matches(flags[0], known, n=1) if flags else []
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = default_model_path()
        print(f"No --model_name_or_path: using the embedded stories260K model ({model_args.model_name_or_path})")
    if script_args.dataset_name is None:
        parser.error("--dataset_name is required: a local JSON/JSONL/Parquet file or folder, or a Hub dataset id")
    try:
        dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config,
                                          streaming=script_args.dataset_streaming)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if script_args.dataset_train_split not in dataset:
        parser.error(f"dataset {script_args.dataset_name!r} has no split {script_args.dataset_train_split!r}; "
                     f"it has {list(dataset)} (set --dataset_train_split)")
    try:
        check_preference_dataset(dataset[script_args.dataset_train_split], name=script_args.dataset_train_split)
    except (ValueError, TypeError) as err:
        parser.error(f"{script_args.dataset_name}: {err}")

    model_init_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                         "dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}
    if training_args.qlora or training_args.lora:  # the preset, with any --lora_* flags applied
        peft_config = lora_defaults(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                    lora_dropout=model_args.lora_dropout,
                                    lora_target_modules=model_args.lora_target_modules or "all-linear",
                                    lora_modules_to_save=model_args.lora_modules_to_save,
                                    use_rslora=model_args.use_rslora, use_dora=model_args.use_dora)
        quantization_config = None
    else:
        peft_config, quantization_config = get_peft_config(model_args), get_quantization_config(model_args)
    eval_split = script_args.dataset_test_split
    trainer = DPOPlusTrainer(
        model=model_args.model_name_or_path, args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[eval_split] if training_args.eval_strategy != "no" and eval_split in dataset else None,
        quantization_config=quantization_config, peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Saved to {training_args.output_dir} (model card: README.md, diagnostics.json/.png)")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return 0


def losses(argv: list[str]) -> int:
    from .losses import get_loss, list_losses

    argparse.ArgumentParser(prog="trl-dpo-plus losses", description="List the registered losses.").parse_args(argv)
    rows = [(n, "no" if get_loss(n).requires_reference else "yes",
             ", ".join(f"{k}={v}" for k, v in get_loss(n).defaults.items()), get_loss(n).paper or "") for n in list_losses()]
    widths = [max(len(r[i]) for r in rows + [("loss", "reference-free", "defaults", "paper")]) for i in range(4)]
    for row in [("loss", "reference-free", "defaults", "paper")] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="trl-dpo-plus", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    top.add_argument("command", choices=COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command = top.parse_args(argv[:1]).command
    rest = argv[1:]
    if command == "train":
        return train(rest)
    if command == "losses":
        return losses(rest)
    if command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return 0
    if not rest:
        top.error("run needs a script: trl-dpo-plus run my_dpo.py [its arguments]")
    from .runner import run_script

    return run_script(rest[0], rest[1:])


if __name__ == "__main__":
    sys.exit(main())
